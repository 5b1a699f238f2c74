"""Helpers shared by the training tests (a plain module: conftest.py is not importable)."""

from __future__ import annotations


def write_rows(path, header, rows, delimiter="\t"):
    """A GLUE-style table: one line a row, no quoting."""
    with open(path, "w") as handle:
        for row in [header, *rows]:
            handle.write(delimiter.join(str(value) for value in row) + "\n")
    return str(path)


def train_args(*extra: str) -> list[str]:
    """Arguments for a fast tiny run: one epoch, small batches, no length grouping."""
    return ["train", "--epochs", "1", "--batch-size", "8", "--validation", "16", *extra]
