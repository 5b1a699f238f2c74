"""Rewrite a folder written by ``ntk-attn train`` before the PEFT route into PEFT's layout, with a portable
base reference (a base inside a pip package becomes ``pkg:PACKAGE/PATH``). Outputs are unchanged.

    python benchmarks/upgrade_adapter_folder.py benchmarks/results/sst2-minilm/ntk [--model PATH]

Run once on benchmarks/results/sst2-minilm/ntk (its base was recorded as an absolute site-packages path).
The new folder is written beside the old one and renamed into place; the old one is removed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch

from ntk_attention.training import models as M
from ntk_attention.tuners.config import portable_reference, read_config_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default=None, help="the base model, when the recorded one is not on this machine")
    args = parser.parse_args()
    if "peft_type" in read_config_file(args.folder):
        raise SystemExit(f"{args.folder} is already in PEFT's layout")
    run = M.read_run(args.folder)
    model, tokenizer, _ = M.load_trained(args.folder, model=args.model)
    probe = tokenizer(["a probe sentence ."], return_tensors="pt")
    with torch.no_grad():
        before = model(**probe).logits
    base = portable_reference(args.model or run["base_model"])
    model.peft_config["default"].base_model_name_or_path = base
    parent = os.path.dirname(os.path.abspath(args.folder))
    staging = tempfile.mkdtemp(prefix=".upgrading-", dir=parent)
    model.save_pretrained(staging)
    os.remove(os.path.join(staging, "README.md"))  # PEFT's model card template: nothing in it
    with open(os.path.join(staging, M.RUN_FILE), "w") as handle:
        json.dump({**run, "base_model": base}, handle, indent=2)
    reloaded, _, _ = M.load_trained(staging, model=args.model)
    with torch.no_grad():
        if not torch.equal(reloaded(**probe).logits, before):
            shutil.rmtree(staging)
            raise SystemExit("the rewritten adapter gives other outputs; nothing was changed")
    old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
    os.replace(args.folder, os.path.join(old, "previous"))
    os.replace(staging, args.folder)
    shutil.rmtree(old)
    print(f"{args.folder}: PEFT layout, base {base}")


if __name__ == "__main__":
    main()
