"""Put the suite's two generated tables into the README: the cross-task table (``lead_table``) and every
curve point (``variant_table``), rendered from ``suite.json``. Each replaces the README table with the
same header row; a header that changed (a task added) is an error naming it, to be pasted by hand once.

    python benchmarks/readme_tables.py            # after `ntk-attn compare --suite ...` updated suite.json

``tests/test_readme.py`` fails until the README holds what this writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ntk_attention.io import write_text
from ntk_attention.training.suite import lead_table, variant_table

ROOT = Path(__file__).resolve().parent.parent


def replace_tables(readme: str, tables: list[str]) -> str:
    """``readme`` with each table of ``tables`` in place of the table that starts with its header row."""
    lines = readme.split("\n")
    for table in tables:
        new = table.rstrip("\n").split("\n")
        starts = [i for i, line in enumerate(lines) if line == new[0]]
        if len(starts) != 1:
            raise SystemExit(f"the README has {len(starts)} tables headed {new[0]!r}, not one: paste this table by hand\n{table}")
        end = starts[0]
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[starts[0]:end] = new
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, default=ROOT / "benchmarks" / "results" / "suite" / "suite.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    write_text(args.readme, replace_tables(args.readme.read_text(), [lead_table(summary), variant_table(summary)]))
    print(f"{args.readme}: tables from {args.summary}")


if __name__ == "__main__":
    main()
