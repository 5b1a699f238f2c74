"""The image-classification route: a tiny random ViT with its image processor, generated images in
ImageFolder layout (and as a tar.gz for suites), trained and reloaded with ntk, lora and prefix."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from ntk_attention import cli
from ntk_attention.training import data as D
from ntk_attention.training import models as M
from ntk_attention.training import suite as S
from training_helpers import train_args

CLASSES = ["cat", "dog", "frog"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _processor():
    return tf.ViTImageProcessor(do_resize=True, size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3)


def _vit(folder, num_labels: int, processor: bool = True) -> str:
    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=16, patch_size=4, num_labels=num_labels, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **SMALL)
    tf.ViTForImageClassification(config).save_pretrained(folder)
    if processor:
        _processor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A ViT pretrained (at random) with a head of 5 classes: the 3-class task needs a new one."""
    return _vit(tmp_path_factory.mktemp("tiny-vit"), 5)


def _image(path, label: int, seed: int) -> None:
    """A 20x20 picture whose colour says its class, with noise (JPEG or PNG by the suffix)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (20, 20, 3))
    pixels[..., label] += 150
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _image_folder(root, split: str, per_class: int, suffix: str = ".jpg") -> None:
    for label, name in enumerate(CLASSES):
        os.makedirs(root / split / name, exist_ok=True)
        for i in range(per_class):
            _image(root / split / name / f"{i:03d}{suffix}", label, seed=(split == "test") * 10_000 + label * 100 + i)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """(train, eval) JSON lines with image paths relative to their folder: 16 / 6 images a class."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for split, count, suffix in (("train", 16, ".png"), ("test", 6, ".jpg")):
        _image_folder(root, split, count, suffix)
        rows = [{"image": f"{split}/{name}/{i:03d}{suffix}", "label": label}
                for label, name in enumerate(CLASSES) for i in range(count)]
        paths.append(str(root / f"{split}.jsonl"))
        with open(paths[-1], "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return tuple(paths)


def run_train(tmp_path, model, train, eval_data, *extra):
    result_file = tmp_path / "result.json"
    args = train_args("--model", model, "--data", train, "--eval-data", eval_data, "--train-size", "32",
                      "--output-dir", str(tmp_path / "run"), "--result-json", str(result_file), *extra)
    assert cli.main(args) == 0
    return json.loads(result_file.read_text())


# method -> (options, parameters of the method itself for the tiny ViT: 2 layers, 4 heads, head dim 8, hidden 32)
METHODS = {
    "ntk": (["--config", "feature_map=elu"], 2 * 4 * (8 * 8 + 8)),  # r = d = 8: Z [r, d] and k [r] per head
    "lora": (["--config", "target_modules=q_proj,v_proj", "r=4"], 2 * 2 * 4 * (32 + 32)),
    "prefix": (["--config", "num_virtual_tokens=3"], 2 * 2 * 4 * 3 * 8),  # keys and values [heads, m, d]
}


@pytest.mark.parametrize("method", list(METHODS))
def test_image_route_trains_and_the_saved_adapter_reloads(tmp_path, capsys, tiny_vit, image_files, method):
    extra, method_params = METHODS[method]
    result = run_train(tmp_path, tiny_vit, *image_files, "--method", method, "--lr", "1e-2", *extra)
    assert result["task"] == "image-classification"  # told from the image column
    assert result["trainable_params"] - result["trainable_params_excl_head"] == 32 * 3 + 3  # the new 3-class head
    assert result["trainable_params_excl_head"] == method_params
    assert result["rows"] == {"train": 32, "validation": 16, "eval": 18}
    accuracy = result["after"]["eval"]["accuracy"]
    assert 0 <= accuracy <= 1 and result["train_seconds"] > 0

    run = M.read_run(result["adapter"])
    assert (run["method"], run["task"], run["num_labels"]) == (method, "image-classification", 3)
    model, processor, _ = M.load_trained(result["adapter"])
    with Image.open(os.path.join(os.path.dirname(image_files[1]), "test/dog/000.jpg")) as image:
        pixels = processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
    again, _, _ = M.load_trained(result["adapter"])
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, again(pixel_values=pixels).logits)
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", result["adapter"], "--data", image_files[1]]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["rows"] == 18 and evaluated["accuracy"] == pytest.approx(accuracy)


def test_a_head_of_the_same_size_starts_anew(tmp_path):
    """A pretrained 3-class head is for the pretraining classes: it is re-initialised and trains."""
    folder = _vit(tmp_path / "vit3", 3)
    pretrained = tf.ViTForImageClassification.from_pretrained(folder).classifier.weight
    base, head = M.load_base(folder, "image-classification", num_labels=3)
    assert head == ["classifier"] and not torch.equal(base.classifier.weight, pretrained)


def test_full_fine_tuning_saves_model_and_processor(tmp_path, tiny_vit, image_files):
    result = run_train(tmp_path, tiny_vit, *image_files, "--method", "full", "--lr", "1e-3")
    assert result["trainable_params"] == result["total_params"]
    assert os.path.isfile(os.path.join(result["adapter"], "preprocessor_config.json"))
    model, processor, _ = M.load_trained(result["adapter"])
    assert isinstance(model, tf.ViTForImageClassification) and model.config.num_labels == 3


@pytest.mark.parametrize("problem, match", [
    ("missing", "row 5: image file .*nowhere.png' does not exist"),
    ("unreadable", "row 5: image file .*broken.png' is not a readable image"),
    ("label", "label 3 is outside the model's 3 classes"),
])
def test_bad_image_data_fails_before_any_model_is_loaded(tmp_path, tiny_vit, image_files, problem, match):
    rows = [json.loads(line) for line in open(image_files[0])]
    if problem == "missing":
        rows[4]["image"] = "train/cat/nowhere.png"
    elif problem == "unreadable":
        (tmp_path / "broken.png").write_text("not a picture")
        rows[4]["image"] = str(tmp_path / "broken.png")
    elif problem == "label":
        rows[4]["label"] = 3
    bad = os.path.join(os.path.dirname(image_files[0]), f"bad-{problem}.jsonl")  # beside the images it names
    with open(bad, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    extra = ["--num-labels", "3"] if problem == "label" else []
    with pytest.raises(ValueError, match=match):
        run_train(tmp_path, "no-such-model-folder/", bad, image_files[1], *extra)


def test_a_model_folder_without_an_image_processor_is_refused(tmp_path, image_files):
    folder = _vit(tmp_path / "bare-vit", 5, processor=False)
    with pytest.raises(ValueError, match="has no image processor"):
        run_train(tmp_path, folder, *image_files)


# ---------------------------------------------------------------- suites: an image archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("archive")
    _image_folder(root, "train", 8)
    _image_folder(root, "test", 4)
    path = root / "tiny-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return str(path)


def _suite(tmp_path, archive, **data) -> S.Suite:
    lines = [f'{key} = {json.dumps(value)}' for key, value in
             {"train": f"{os.path.basename(archive)}:train", "eval": f"{os.path.basename(archive)}:test", **data}.items()]
    path = tmp_path / "images.toml"
    path.write_text('name = "images"\ntask = "image-classification"\nmetric = "accuracy"\nmodel = "m"\n'
                    'variants = ["head"]\n[data]\n' + "\n".join(lines) + "\n[budget]\ntrain_size = 4\nvalidation = 2\n"
                    "eval_size = 5\n")
    return S.load_suite(str(path))


def test_suite_extracts_the_named_classes_in_label_order(tmp_path, archive):
    suite = _suite(tmp_path, archive, label_names=["frog", "cat"])
    train, evaluation = S.prepare_data(suite, os.path.dirname(archive), str(tmp_path / "data"))
    rows = {split: [json.loads(line) for line in open(path)] for split, path in (("train", train), ("eval", evaluation))}
    assert len(rows["train"]) == 6 and len(rows["eval"]) == 5  # train_size + validation; eval_size
    assert sorted(row["label"] for row in rows["train"]) == [0, 0, 0, 1, 1, 1]  # drawn evenly over the classes
    for split, folder in (("train", "train"), ("eval", "test")):
        for row in rows[split]:
            assert row["image"].startswith(f"images/{folder}/{['frog', 'cat'][row['label']]}/")  # relative to the file
            assert os.path.isfile(os.path.join(tmp_path / "data", row["image"]))
    assert not os.path.exists(tmp_path / "data" / "images" / "train" / "dog")  # only what the suite needs
    table = D.load_table(train)
    assert D.check_table(table, "image-classification", D.Columns(), train) == 2
    before = S.data_fingerprint((train, evaluation))
    again = S.prepare_data(suite, os.path.dirname(archive), str(tmp_path / "data"))
    assert S.data_fingerprint(again) == before
    _image(tmp_path / "data" / rows["eval"][0]["image"], 2, seed=99)  # the same rows, another picture
    assert S.data_fingerprint(again) != before


def test_preparing_the_data_again_leaves_the_images_in_place(tmp_path, archive):
    """A second compare of the same suite (possibly while the first trains) rewrites no image it drew,
    and puts back one that was changed, atomically (a new file, not the reader's one)."""
    suite = _suite(tmp_path, archive, label_names=["frog", "cat"])
    data = tmp_path / "data"
    train, _ = S.prepare_data(suite, os.path.dirname(archive), str(data))
    paths = [data / json.loads(line)["image"] for line in open(train)]
    stamps = {path: os.stat(path).st_ino for path in paths}
    _image(paths[1], 2, seed=99)  # changed behind our back
    with open(paths[0], "rb") as held:  # a training process reading one image
        original = held.read()
        S.prepare_data(suite, os.path.dirname(archive), str(data))
        held.seek(0)
        assert held.read() == original
    unchanged = [paths[0], *paths[2:]]
    assert {path: os.stat(path).st_ino for path in unchanged} == {path: stamps[path] for path in unchanged}
    with tarfile.open(archive) as tar:
        name = os.path.relpath(paths[1], data / "images")
        assert paths[1].read_bytes() == tar.extractfile(name).read()  # restored from the archive


def test_suite_names_a_class_the_archive_lacks(tmp_path, archive):
    suite = _suite(tmp_path, archive, label_names=["cat", "horse"])
    with pytest.raises(ValueError, match=r"classes \['horse'\] are not under 'train/'.*\['cat', 'dog', 'frog'\]"):
        S.prepare_data(suite, os.path.dirname(archive), str(tmp_path / "data"))


def test_image_suite_needs_label_names_and_two_splits(tmp_path, archive):
    with pytest.raises(ValueError, match="label_names"):
        _suite(tmp_path, archive)
    with pytest.raises(ValueError, match="the same split"):
        _suite(tmp_path, archive, label_names=["cat", "dog"], eval=f"{os.path.basename(archive)}:train")
