"""Pretrain a small ViT from scratch on CIFAR-10's first five classes: the vision suite's stand-in base.

No pretrained vision transformer can be obtained offline here, so ``benchmarks/suites/cifar5.toml``
adapts this one, pretrained on airplane, automobile, bird, cat and deer (train split), to the other
five classes. It is a stand-in for the paper's ImageNet ViT, not one.

    python benchmarks/pretrain_vit_cifar5.py --out benchmarks/models/vit-cifar5-standin --threads 1

Writes, atomically (a temporary folder beside ``--out``, then a rename), the model and its
``ViTImageProcessor`` (``save_pretrained``), ``pretrain_log.json`` (config, seed, epochs, per-epoch
train loss, accuracy on the five classes' test images, wall seconds, machine and command) and a
README.md that says what the model is, from that log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from ntk_attention.training.data import archive_images

CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]  # CIFAR-10 labels 0-4; the suite adapts to 5-9


def load_split(archive: str, split: str, folder: str) -> tuple[np.ndarray, torch.Tensor]:
    """All images of the five classes in ``split`` as uint8 HWC arrays, and their labels."""
    rows = archive_images(archive, split, CLASSES, folder)
    images = np.stack([np.asarray(Image.open(row["image"]).convert("RGB")) for row in rows])
    return images, torch.tensor([row["label"] for row in rows])


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4 pixels of zero padding (zero after normalisation: the mean colour) and a
    horizontal flip, per image."""
    batch, _, height, width = pixels.shape
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (batch,), generator=generator)
    dx = torch.randint(0, 9, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None].expand(batch, 3, height, width + 8)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :].expand(batch, 3, height, width)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(batch, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return cropped


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    right = sum((model(pixel_values=pixels[i:i + batch_size]).logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
                for i in range(0, len(labels), batch_size))
    return right / len(labels)


def write_readme(folder: str, log: dict) -> None:
    """README.md of the model folder, from its log: a stand-in, how it was made, what it reached."""
    config = log["config"]
    text = f"""# vit-cifar5-standin: a STAND-IN, not a pretrained ImageNet ViT

No pretrained vision transformer can be obtained offline here. This ViT was trained from scratch in
this repository on CIFAR-10's first five classes ({", ".join(log["classes"])}; the train split, {log["train_images"]:,}
images) and exists so that `benchmarks/suites/cifar5.toml` can adapt it to the other five classes (dog, frog,
horse, ship, truck). It is much smaller and weaker than an ImageNet-pretrained ViT such as the paper's vision setting uses;
results on it compare methods on this base only.

- architecture: ViT, image size {config["image_size"]}, patch {config["patch_size"]}, hidden {config["hidden_size"]}, {config["num_hidden_layers"]} layers, {config["num_attention_heads"]} heads, MLP {config["intermediate_size"]}; {log["parameters"]:,} parameters
- training: {log["epochs"]} epochs, batch {log["batch_size"]}, AdamW lr {log["lr"]:g}, weight decay {log["weight_decay"]:g}, {log["schedule"]}; augmentation: {log["augmentation"]}; seed {log["seed"]}
- **accuracy on the five pretraining classes' CIFAR-10 test images ({log["test_images"]:,}): {log["test_accuracy"]:.4f}**
- wall time: {log["wall_s"] / 60:.1f} minutes on {log["threads"]} CPU thread(s) ({log["machine"]}, torch {log["torch"]}; other jobs shared the machine)
- inputs: `preprocessor_config.json` (ViTImageProcessor: resize to 32x32, normalised with the training images' channel mean and std)
- made by (from the repository root): `{log["command"]}`

`pretrain_log.json` holds the per-epoch training loss and everything above.
"""
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the model, its image processor and pretrain_log.json")
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "cifar10", "cifar10-jpeg.tar.gz"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    with tempfile.TemporaryDirectory(prefix="cifar5-") as scratch:
        train_images, train_labels = load_split(args.data, "train", scratch)
        test_images, test_labels = load_split(args.data, "test", scratch)
    # The saved processor normalises with the training images' channel statistics; the pixels for
    # training go through that same processor, so the suite sees exactly what pretraining saw.
    mean = (train_images / 255.0).mean(axis=(0, 1, 2)).round(4).tolist()
    std = (train_images / 255.0).std(axis=(0, 1, 2)).round(4).tolist()
    processor = ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, do_rescale=True,
                                  do_normalize=True, image_mean=mean, image_std=std)
    train_pixels = processor(list(train_images), return_tensors="pt")["pixel_values"]
    test_pixels = processor(list(test_images), return_tensors="pt")["pixel_values"]
    print(f"data: {len(train_labels)} train, {len(test_labels)} test images ({time.time() - start:.0f} s)", flush=True)

    config = ViTConfig(image_size=32, patch_size=args.patch_size, num_channels=3, hidden_size=args.hidden_size,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=2 * args.hidden_size, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=len(CLASSES),
                       id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch  # one epoch of linear warm-up, then cosine
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))))
    generator = torch.Generator().manual_seed(args.seed)
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        losses = []
        for i in range(0, len(order), args.batch_size):
            index = order[i:i + args.batch_size]
            loss = model(pixel_values=augment(train_pixels[index], generator), labels=train_labels[index]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            losses.append(loss.item())
        epochs.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "wall_s": round(time.time() - start, 1)})
        print(f"epoch {epoch + 1}: train loss {epochs[-1]['train_loss']:.4f} ({epochs[-1]['wall_s']:.0f} s)", flush=True)
    test_accuracy = accuracy(model, test_pixels, test_labels)
    wall = time.time() - start
    print(f"test accuracy on {CLASSES}: {test_accuracy:.4f}; {wall:.0f} s", flush=True)

    log = {"what": "stand-in base for the vision suite: a ViT pretrained from scratch on CIFAR-10's first five "
                   "classes (train split), not on ImageNet",
           "classes": CLASSES, "config": config.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
           "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "weight_decay": args.weight_decay, "schedule": "1 epoch linear warm-up, cosine to 0",
           "augmentation": "random crop with 4-pixel padding, horizontal flip",
           "train_images": len(train_labels), "per_epoch": epochs,
           "test_images": len(test_labels), "test_accuracy": test_accuracy, "wall_s": round(wall, 1),
           "threads": args.threads, "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
           "torch": torch.__version__, "command": " ".join(["python"] + sys.argv)}
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".pretrain-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        with open(os.path.join(staging, "pretrain_log.json"), "w") as handle:
            json.dump(log, handle, indent=2)
        write_readme(staging, log)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model is for sharing
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
