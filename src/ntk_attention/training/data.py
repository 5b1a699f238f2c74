"""Data for training and evaluation: load a table, check it, carve a validation slice, tokenize.

Four tasks:
- ``classification``: a text column (and optionally a second text column for sentence pairs) and an
  integer label column (0 .. num_labels-1).
- ``causal-lm``: a prompt field and an answer field; the loss is on the answer tokens only and the
  prompt goes through the tokenizer's chat template when it has one.
- ``language-modeling``: a text column; the texts are joined (each ended by EOS) and cut into blocks
  of ``max_length`` tokens, the loss is on every token, and perplexity is ``exp`` of the mean loss.
- ``image-classification``: an image column of file paths (relative ones are relative to the data
  file's folder) and an integer label column; the model's image processor turns them into
  ``pixel_values`` as batches are drawn. ``archive_images`` extracts such rows from a tar archive in
  ImageFolder layout (``<split>/<class>/<image>``, CIFAR-10's JPEG release).

A data source is a local ``.tsv`` / ``.csv`` / ``.jsonl`` / ``.json`` file, or, for users with the
Hugging Face hub, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT`` (e.g. ``nyu-mll/glue:sst2:train``).
Every check runs before any model is loaded, so bad input fails fast.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..io import write_atomically

TASKS = ("classification", "causal-lm", "language-modeling", "image-classification")
CLASSIFICATION_TASKS = ("classification", "image-classification")  # a label per row, a new head
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FILE_BUILDERS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json"}
IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


def embedded_sst2(split: str) -> str:
    """Path of the SST-2 sample shipped in the package (``train`` or ``dev``); see data/SST2_SOURCE.md."""
    return str(importlib.resources.files("ntk_attention") / "data" / f"sst2_{split}.tsv")


@dataclass
class Columns:
    """Which columns hold the inputs. ``text=None`` means: the only column besides the label."""

    text: str | None = None
    text_pair: str | None = None  # the second sentence of a pair (RTE's hypothesis, BoolQ's passage)
    label: str = "label"
    prompt: str = "question"
    answer: str = "answer"
    image: str = "image"  # image-classification: the column of image file paths


def load_table(source: str) -> datasets.Dataset:
    """Load a local file or a hub split as a ``datasets.Dataset``; raise ValueError if it is empty."""
    suffix = os.path.splitext(source)[1].lower()
    if os.path.exists(source) or suffix in FILE_BUILDERS:
        table = _load_file(source, suffix)
    else:
        table = _load_hub(source)
    if len(table) == 0:
        raise ValueError(f"data {source!r} has no rows")
    return table


def _load_file(path: str, suffix: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if suffix not in FILE_BUILDERS:
        raise ValueError(f"data file {path!r}: expected a .tsv, .csv, .jsonl or .json file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty")
    if FILE_BUILDERS[suffix] == "csv" and _count_lines(path) < 2:
        raise ValueError(f"data file {path!r} has no rows (a header line at most)")
    options = {}
    if suffix == ".tsv":
        # GLUE TSVs contain bare quote characters: no quoting; keep "NA"/"null" as text.
        options = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    elif suffix == ".csv":
        options = dict(keep_default_na=False)
    try:
        return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=path, split="train", **options)
    except Exception as error:  # the builders raise many types (pandas, pyarrow, json)
        raise ValueError(f"data file {path!r} could not be read as {suffix}: {error}") from error


def _count_lines(path: str, enough: int = 2) -> int:
    count = 0
    with open(path, errors="replace") as handle:
        for line in handle:
            count += bool(line.strip())
            if count >= enough:
                break
    return count


def _load_hub(spec: str) -> datasets.Dataset:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"data {spec!r}: expected an existing .tsv/.csv/.jsonl/.json file, or a hub dataset as "
            "NAME:SPLIT or NAME:CONFIG:SPLIT"
        )
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    return datasets.load_dataset(name, config, split=split)


def infer_task(table: datasets.Dataset, columns: Columns) -> str:
    """``classification`` when the label column is there, ``causal-lm`` when prompt and answer are."""
    names = table.column_names
    if columns.label in names and columns.image in names:
        return "image-classification"
    if columns.label in names:
        return "classification"
    if columns.prompt in names and columns.answer in names:
        return "causal-lm"
    raise ValueError(
        f"cannot tell the task from columns {names}: expected a label column {columns.label!r} "
        f"(classification; with an image column {columns.image!r}: image-classification) or prompt/answer fields {columns.prompt!r}/{columns.answer!r} (causal-lm); "
        "name them with --label-column or --prompt-field/--answer-field"
    )


def text_column(table: datasets.Dataset, columns: Columns, source: str) -> str:
    """The text column: the one named, or else the only column besides the label."""
    names = table.column_names
    if columns.text_pair is not None and columns.text_pair not in names:
        raise ValueError(f"data {source!r} has no text-pair column {columns.text_pair!r} (columns: {names})")
    if columns.text is not None:
        if columns.text not in names:
            raise ValueError(f"data {source!r} has no text column {columns.text!r} (columns: {names})")
        return columns.text
    others = [name for name in names if name not in (columns.label, columns.text_pair)]
    if len(others) != 1:
        raise ValueError(f"data {source!r}: cannot tell the text column among {others}; name it with --text-column")
    return others[0]


def check_classification(table: datasets.Dataset, columns: Columns, source: str, num_labels: int | None = None) -> int:
    """Check the text column, and that the label column holds integers in 0 .. num_labels-1; return
    num_labels. When it is None, it is the largest label + 1 and every class below it must occur."""
    if columns.label in table.column_names:  # a missing label column is check_labels' error, and the first
        text_column(table, columns, source)
    return check_labels(table, columns, source, num_labels)


def check_labels(table: datasets.Dataset, columns: Columns, source: str, num_labels: int | None = None) -> int:
    """The label half of ``check_classification``, shared with images."""
    if columns.label not in table.column_names:
        raise ValueError(f"data {source!r} has no label column {columns.label!r} (columns: {table.column_names})")
    labels = []
    for row, value in enumerate(table[columns.label]):
        label = _as_int(value)
        if label is None or label < 0:
            raise ValueError(
                f"data {source!r}, row {row + 1}: label {value!r} in column {columns.label!r} is not a "
                "non-negative integer (class labels must be 0, 1, 2, ...)"
            )
        labels.append(label)
    found = max(labels) + 1
    if num_labels is not None:
        if found > num_labels:
            raise ValueError(f"data {source!r}: label {found - 1} is outside the model's {num_labels} classes")
        return num_labels
    # Without --num-labels the classes are 0 .. max: a stray label 7 in binary data would make 8.
    absent = sorted(set(range(found)) - set(labels))
    if absent or found < 2:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        problem = f"classes {shown} never occur" if absent else "only class 0 occurs"
        raise ValueError(f"data {source!r}: labels in column {columns.label!r} must be 0 .. K-1 with every class "
                         f"present, but the largest is {found - 1} and {problem}; fix the labels, or give "
                         "--num-labels K when some classes are absent on purpose")
    return found


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def image_paths(table: datasets.Dataset, columns: Columns, source: str) -> list[str]:
    """The image column's paths, relative ones taken from the data file's folder (so a data folder can move)."""
    if columns.image not in table.column_names:
        raise ValueError(f"data {source!r} has no image column {columns.image!r} (columns: {table.column_names})")
    folder = os.path.dirname(source) if os.path.isfile(source) else ""
    return [os.path.join(folder, str(path)) for path in table[columns.image]]


def check_images(table: datasets.Dataset, columns: Columns, source: str, num_labels: int | None = None) -> int:
    """Image classification: every image file exists and PIL can read it; labels as for text."""
    from PIL import Image, UnidentifiedImageError

    for row, path in enumerate(image_paths(table, columns, source)):
        if not os.path.isfile(path):
            raise ValueError(f"data {source!r}, row {row + 1}: image file {path!r} does not exist")
        try:
            with Image.open(path) as image:
                image.verify()  # reads the whole file without decoding the pixels
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"data {source!r}, row {row + 1}: image file {path!r} is not a readable image ({error})") from None
    return check_labels(table, columns, source, num_labels)


def check_causal(table: datasets.Dataset, columns: Columns, source: str) -> None:
    """Check the prompt and answer fields exist and hold text."""
    for field in (columns.prompt, columns.answer):
        if field not in table.column_names:
            raise ValueError(f"data {source!r} has no field {field!r} (fields: {table.column_names})")
        bad = next((i for i, value in enumerate(table[field]) if not isinstance(value, str)), None)
        if bad is not None:
            raise ValueError(f"data {source!r}, row {bad + 1}: field {field!r} is not text")


def check_table(table: datasets.Dataset, task: str, columns: Columns, source: str, num_labels: int | None = None):
    """Run the checks for ``task``; return num_labels for (image) classification, None otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "classification":
        return check_classification(table, columns, source, num_labels)
    if task == "image-classification":
        return check_images(table, columns, source, num_labels)
    if task == "language-modeling":
        check_texts(table, columns, source)
        return None
    check_causal(table, columns, source)
    return None


def check_texts(table: datasets.Dataset, columns: Columns, source: str) -> None:
    """Language modelling: the text column exists and holds text."""
    name = text_column(table, columns, source)
    bad = next((i for i, value in enumerate(table[name]) if not isinstance(value, str)), None)
    if bad is not None:
        raise ValueError(f"data {source!r}, row {bad + 1}: column {name!r} is not text")


def first_rows(table: datasets.Dataset, count: int | None) -> datasets.Dataset:
    """The first ``count`` rows (all when ``count`` is None)."""
    if count is None:
        return table
    if count < 1:
        raise ValueError(f"a row count must be >= 1, got {count}")
    return table.select(range(min(count, len(table))))


def split_validation(table: datasets.Dataset, validation: float, train_size: int | None, seed: int):
    """Carve a validation slice off ``table`` (a fraction < 1 or a row count), then keep at most
    ``train_size`` training rows. The same ``seed`` always gives the same slices."""
    count = int(round(validation * len(table))) if validation < 1 else int(validation)
    if not 0 < count < len(table):
        raise ValueError(f"validation slice of {validation} leaves no training or no validation rows ({len(table)} rows)")
    if train_size is not None and train_size <= 0:
        raise ValueError(f"train_size must be positive, got {train_size}")
    shuffled = table.shuffle(seed=seed)
    validation_rows = shuffled.select(range(count))
    end = len(table) if train_size is None else min(len(table), count + train_size)
    return shuffled.select(range(count, end)), validation_rows


def encode_classification(table: datasets.Dataset, tokenizer, text: str, label: str, max_length: int,
                          text_pair: str | None = None):
    def encode(batch):
        pair = batch[text_pair] if text_pair else None
        encoded = tokenizer(batch[text], pair, truncation=True, max_length=max_length)
        encoded["labels"] = [int(value) for value in batch[label]]
        return encoded

    return table.map(encode, batched=True, remove_columns=table.column_names, desc="tokenize")


def encode_images(table: datasets.Dataset, processor, columns: Columns, source: str):
    """``pixel_values`` and ``labels``, made by the model's image processor when a batch is drawn (decoded
    images would take 600 kB each at 224 pixels)."""
    table = table.add_column("_path", image_paths(table, columns, source))

    def encode(batch):
        from PIL import Image

        images = []
        for path in batch["_path"]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        encoded = processor(images, return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": [int(value) for value in batch[columns.label]]}

    return table.with_transform(encode)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt as the model sees it before its answer (chat template if any)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + "\n")["input_ids"]


def encode_causal(table: datasets.Dataset, tokenizer, prompt: str, answer: str, max_length: int):
    """input_ids = prompt + answer + eos; labels mask the prompt so the loss is on the answer only."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(row):
        head = prompt_ids(tokenizer, row[prompt])
        tail = tokenizer(row[answer], add_special_tokens=False)["input_ids"] + eos
        ids = (head + tail)[:max_length]
        labels = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return table.map(encode, remove_columns=table.column_names, desc="tokenize")


def encode_blocks(table: datasets.Dataset, tokenizer, text: str, block_size: int):
    """Language modelling: every text plus EOS, joined and cut into blocks of ``block_size`` tokens (the
    last partial block is dropped, so every block weighs the same in the mean loss)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [token for value in table[text] for token in tokenizer(value, add_special_tokens=False)["input_ids"] + eos]
    count = len(ids) // block_size
    if count == 0:
        raise ValueError(f"language modelling: {len(ids)} tokens make no block of {block_size} (lower --max-length)")
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(count)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * count,
                                       "labels": blocks})


def archive_images(archive: str, split: str, classes: list[str], folder: str, count: int | None = None,
                   seed: int = 0) -> list[dict]:
    """Extract the images of ``split/<class>/`` for ``classes`` from a tar archive (ImageFolder layout,
    e.g. CIFAR-10's ``train/dog/0001.jpg``) into ``folder/<split>/<class>/``; return rows
    ``{"image": path, "label": index in classes}`` in an order shuffled with ``seed``. ``count`` keeps that
    many, drawn with ``seed`` as evenly over the classes as their sizes allow; only those are extracted."""
    if not os.path.isfile(archive):
        raise ValueError(f"image archive {archive!r} does not exist")
    bad = [name for name in classes if name in ("", ".", "..") or "/" in name]
    if bad:  # a class is one folder name; anything else could extract outside ``folder``
        raise ValueError(f"image archive {archive!r}: {bad} are not class folder names")
    found: dict[str, list[str]] = {}
    with tarfile.open(archive) as tar:  # a first pass lists the names; extraction is a second, streamed one
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(IMAGE_SUFFIXES):
                found.setdefault(parts[1], []).append(member.name)
    if not found:
        raise ValueError(f"image archive {archive!r} has no images under {split + '/'!r} (<split>/<class>/<image>)")
    missing = [name for name in classes if name not in found]
    if missing:
        raise ValueError(f"image archive {archive!r}: classes {missing} are not under {split + '/'!r} "
                         f"(classes there: {sorted(found)})")
    rng = random.Random(seed)
    chosen = {}
    wanted = _balanced(count, [len(found[name]) for name in classes], archive)
    for label, name in enumerate(classes):
        names = sorted(found[name])
        rng.shuffle(names)
        chosen.update((member, label) for member in names[:wanted[label]])
    rows = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name in chosen:
                path = os.path.join(folder, member.name)  # split/class/file, checked above: no "..", no absolute path
                with tar.extractfile(member) as source:
                    content = source.read()
                if not (os.path.isfile(path) and Path(path).read_bytes() == content):
                    # atomically, and only when it differs: a run of the same suite may be reading it
                    write_atomically(path, lambda tmp: Path(tmp).write_bytes(content))
                rows.append({"image": path, "label": chosen[member.name]})
    rows.sort(key=lambda row: row["image"])
    random.Random(seed).shuffle(rows)  # the first rows of the file are a mix of classes (eval_size takes them)
    return rows


def _balanced(count: int | None, sizes: list[int], source: str) -> list[int]:
    """How many to take of each class: ``count`` split as evenly as the class sizes allow (None: all)."""
    if count is None:
        return sizes
    if not 0 < count <= sum(sizes):
        raise ValueError(f"{source}: cannot draw {count} images from {sum(sizes)}")
    taken = [0] * len(sizes)
    while count:
        open_classes = [i for i, size in enumerate(sizes) if taken[i] < size]
        share = max(1, count // len(open_classes))
        for i in open_classes:
            step = min(share, sizes[i] - taken[i], count)
            taken[i] += step
            count -= step
    return taken
