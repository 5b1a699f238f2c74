"""Run ``ntk-attn train`` and kill the process with SIGKILL at a chosen point (used by test_resume.py).

    python crash_run.py POINT -- TRAIN ARGUMENTS...

POINT is one of
    step:N                 at the start of the N-th optimizer step (mid-epoch)
    checkpoint:N:FILE      half-way through writing FILE of checkpoint-N (adapter_model.safetensors,
                           optimizer.pt or trainer_state.json): the file is cut, then the kill
    save                   while the finished adapter is being written (save_trained)
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import torch
import transformers

from ntk_attention import cli


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_and_die(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    die()


def in_checkpoint(path, step: int, name: str) -> bool:
    return str(path).endswith(os.path.join(f"checkpoint-{step}", name))


def arm(point: str) -> None:
    kind, *rest = point.split(":")
    if kind == "step":
        target, steps = int(rest[0]), [0]
        training_step = transformers.Trainer.training_step

        def counted(self, *args, **kwargs):
            steps[0] += 1
            if steps[0] == target:
                die()
            return training_step(self, *args, **kwargs)

        transformers.Trainer.training_step = counted
    elif kind == "checkpoint":
        step, name = int(rest[0]), rest[1]
        if name == "adapter_model.safetensors":  # written by PEFT's save_pretrained (the PEFT route)
            import peft.peft_model

            save_file = peft.peft_model.safe_save_file

            def cut_save_file(tensors, path, **kwargs):
                if in_checkpoint(path, step, name):
                    from safetensors.torch import save

                    write_half_and_die(path, save(tensors, **kwargs))
                return save_file(tensors, path, **kwargs)

            peft.peft_model.safe_save_file = cut_save_file
        elif name.endswith((".pt", ".pth")):
            torch_save = torch.save

            def cut_torch_save(obj, path, *args, **kwargs):
                if in_checkpoint(path, step, name):
                    buffer = io.BytesIO()
                    torch_save(obj, buffer, *args, **kwargs)
                    write_half_and_die(path, buffer.getvalue())
                return torch_save(obj, path, *args, **kwargs)

            torch.save = cut_torch_save
        elif name == "trainer_state.json":
            save_to_json = transformers.TrainerState.save_to_json

            def cut_state(self, path):
                if in_checkpoint(path, step, name):
                    write_half_and_die(path, json.dumps(self.__dict__, default=str).encode())
                return save_to_json(self, path)

            transformers.TrainerState.save_to_json = cut_state
        else:
            raise SystemExit(f"crash_run: no kill point for {name!r}")
    elif kind == "save":
        dump = json.dump

        def cut_dump(obj, handle, *args, **kwargs):
            if getattr(handle, "name", "").endswith("training_run.json"):
                handle.write(json.dumps(obj)[:10])
                handle.flush()
                die()
            return dump(obj, handle, *args, **kwargs)

        json.dump = cut_dump
    else:
        raise SystemExit(f"crash_run: unknown kill point {point!r}")


if __name__ == "__main__":
    point, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    arm(point)
    sys.exit(cli.main(argv))
