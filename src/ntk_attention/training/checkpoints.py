"""``--resume``: continue the same run from its newest complete checkpoint, or say why not.

A run records its settings in ``<output-dir>/run_settings.json`` before it trains; ``--resume``
compares them with the new command line and refuses, naming the fields that differ, when they are
not the same run (a checkpoint of another config would otherwise continue silently). The learning
rates may change: each trains in its own ``checkpoints/lr-*`` folder, so kept rates resume and new
ones start, which is how a grid is widened without training it again. A process
killed while Trainer writes ``checkpoint-N`` leaves a folder that Trainer cannot resume from; such
folders are skipped (and removed) and the newest complete one is used.

Trainer writes a checkpoint's weights, optimizer, scheduler and random states first and
``trainer_state.json`` last, so a checkpoint is complete when every one of those files is there
and readable.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import time
import zipfile

from safetensors import safe_open
from transformers import TrainerCallback

from ..io import write_json

SETTINGS_FILE = "run_settings.json"
RATES_KEY = "learning_rates"  # may change on --resume: every rate has its own checkpoint folder
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")  # PEFT / ours and Trainer's
SHARD_INDEX = "model.safetensors.index.json"
STATE_FILES = ("optimizer.pt", "scheduler.pt")  # torch.save zip archives, as are rng_state*.pth (one per process)
STAGING_PREFIXES = (".saving-", ".replaced-")  # what a killed save_trained leaves beside the adapter
SECONDS_FILE = "ntk_attn_train_seconds.json"  # in each checkpoint: the training seconds it took to reach it


def say(message: str) -> None:
    print(f"ntk-attn train: {message}", file=sys.stderr, flush=True)


def record_settings(output_dir: str, settings: dict, resume: bool, is_main_process: bool = True) -> None:
    """With ``resume``, check that ``settings`` are those the run in ``output_dir`` started with;
    then record them (the main process only)."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # as they read back: tuples become lists
    if resume and os.path.isfile(path):
        try:
            with open(path) as handle:
                recorded = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--resume: cannot read {path} ({error}); delete the output folder or use another "
                             "--output-dir") from None
        # A key the file lacks was not recorded by the version that started the run: not compared.
        differ = [f"{key} {recorded[key]!r} (now {settings.get(key)!r})"
                  for key in sorted(recorded) if key != RATES_KEY and recorded[key] != settings.get(key)]
        if differ:
            raise ValueError(f"--resume: {output_dir} holds a run started with other settings: " + "; ".join(differ)
                             + ". Resume with the same options, or train into another --output-dir")
        old_rates, new_rates = recorded.get(RATES_KEY) or [], settings.get(RATES_KEY) or []
        if is_main_process and sorted(old_rates) != sorted(new_rates):
            # Each rate trains in its own checkpoints/lr-* folder, so a changed grid only adds or drops runs.
            kept = [rate for rate in new_rates if rate in old_rates]
            say(f"--resume: learning rates {old_rates} are now {new_rates}: "
                + (f"{kept} resume from their checkpoints, " if kept else "")
                + "the others start from the beginning")
    elif resume and checkpoint_folders(os.path.join(output_dir, "checkpoints")):
        raise ValueError(f"--resume: {output_dir} has checkpoints but no {SETTINGS_FILE} (written by an older "
                         "version), so it cannot be checked to be the same run; delete it or use another --output-dir")
    if is_main_process:
        write_json(path, settings)


def checkpoint_folders(root: str) -> list[str]:
    """Every ``checkpoint-N`` folder below ``root`` (one level of ``lr-*`` folders or directly)."""
    folders = glob.glob(os.path.join(root, "checkpoint-*")) + glob.glob(os.path.join(root, "*", "checkpoint-*"))
    return [f for f in folders if CHECKPOINT.match(os.path.basename(f)) and os.path.isdir(f)]


def checkpoint_problem(folder: str) -> str | None:
    """Why Trainer cannot resume from ``folder`` (None: it is complete)."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json"
    try:
        with open(state) as handle:
            json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is not readable JSON"
    weights = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    index = os.path.join(folder, SHARD_INDEX)
    if os.path.isfile(index):  # a large `full` model is saved in shards
        try:
            with open(index) as handle:
                weights += sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError):
            return f"{SHARD_INDEX} is not readable"
    if not weights:
        return f"no weights ({' or '.join(WEIGHT_FILES)})"
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own types for a cut header or buffer
            return f"{name} is not readable ({error})"
    rng_states = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "rng_state*.pth")))
    if not rng_states:
        return "no rng_state.pth"
    for name in STATE_FILES + tuple(rng_states):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"no {name}"
        try:  # torch.save writes a zip whose directory comes last: a cut file has none
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return f"{name} is cut short"
    return None


def newest_complete_checkpoint(run_dir: str, remove_incomplete: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``run_dir``; newer incomplete ones are reported and
    removed (Trainer would otherwise write into them, or resume from them, later) by the main process."""
    folders = sorted(checkpoint_folders(run_dir), key=lambda f: int(CHECKPOINT.match(os.path.basename(f))[1]),
                     reverse=True)
    for folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        say(f"skipping incomplete {folder} ({problem}; a run killed while saving it)")
        if remove_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return None


def remove_checkpoints(root: str) -> None:
    """A fresh start (no ``--resume``): the checkpoints of an earlier run in the same folder must not be
    resumed from later, so they go."""
    folders = checkpoint_folders(root)
    if folders:
        say(f"starting afresh: removing {len(folders)} checkpoint(s) of an earlier run in {root} "
            "(pass --resume to continue it)")
    for folder in folders:
        shutil.rmtree(folder)


def remove_save_leftovers(output_dir: str) -> None:
    """The staging folders of a ``save_trained`` that was killed (its result is written again)."""
    for prefix in STAGING_PREFIXES:
        for folder in glob.glob(os.path.join(output_dir, prefix + "*")):
            shutil.rmtree(folder, ignore_errors=True)


class TrainSeconds(TrainerCallback):
    """The training seconds of one learning rate across resumes. Each checkpoint records the seconds
    spent to reach it, and a run resumed from it counts on from there, so a rate resumed complete
    reports the time it took rather than the resume's ~0 s (checkpoints from before this file count 0)."""

    def __init__(self, checkpoint: str | None):
        self.before = checkpoint_seconds(checkpoint)
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            write_json(os.path.join(folder, SECONDS_FILE), {"train_seconds": self.seconds})


def checkpoint_seconds(checkpoint: str | None) -> float:
    """The training seconds recorded in ``checkpoint`` (0 without a checkpoint or the file)."""
    path = os.path.join(checkpoint or "", SECONDS_FILE)
    if checkpoint is None or not os.path.isfile(path):
        return 0.0
    try:
        with open(path) as handle:
            return float(json.load(handle)["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not readable ({error}); delete it to count this checkpoint's time as 0") from None
