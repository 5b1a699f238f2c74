"""Property: whatever happens to an adapter folder (truncated, bytes altered, config and weights from two
saves, a file missing), PeftModel.from_pretrained either refuses it with a Python error or loads exactly
what one save wrote. Never a silent acceptance of something else."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from tuner_models import build, inputs_for, randomize_adapter

from ntk_attention import NTKConfig
from ntk_attention.tuners.config import UNBOUND_FIELDS

FILES = ("adapter_config.json", "adapter_model.safetensors")
BATCH = {k: v for k, v in inputs_for("llama-gqa").items() if k != "labels"}


def logits(model):
    with torch.no_grad():
        return model(**BATCH).logits


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """Two saves of same-shaped adapters with different values, and the outputs each gives."""
    root = tmp_path_factory.mktemp("saves")
    outputs = {}
    for seed in (1, 2):
        model = get_peft_model(build("llama-gqa"), NTKConfig(task_type="CAUSAL_LM"))
        randomize_adapter(model, seed=seed)
        model.save_pretrained(root / str(seed))
        outputs[seed] = logits(model)
    return root, outputs


damage = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0.0, 0.999), st.integers(1, 255)),
    st.tuples(st.just("mix"), st.sampled_from(FILES)),
    st.tuples(st.just("remove"), st.sampled_from(FILES)),
)


def apply(folder, other, change) -> None:
    kind, name = change[0], change[1]
    path = folder / name
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(change[2] * len(data))])
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        data[int(change[2] * len(data))] ^= change[3]
        path.write_bytes(bytes(data))
    elif kind == "mix":
        shutil.copyfile(other / name, path)
    else:
        path.unlink()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(damage, min_size=1, max_size=2))
def test_damaged_folders_are_refused_or_load_what_one_save_wrote(saves, tmp_path_factory, changes):
    root, outputs = saves
    folder = tmp_path_factory.mktemp("damaged")
    for name in FILES:
        shutil.copyfile(root / "1" / name, folder / name)
    for change in changes:
        if (folder / change[1]).exists():
            apply(folder, root / "2", change)
    original = {n: (root / "1" / n).read_bytes() for n in FILES}
    mixed_back = {n: (root / "2" / n).read_bytes() for n in FILES}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(build("llama-gqa"), folder)
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    out = logits(loaded)
    now = {n: (folder / n).read_bytes() for n in FILES}
    # accepted: the weights are one save's, bit for bit, and give that save's outputs
    assert now["adapter_model.safetensors"] in (original["adapter_model.safetensors"], mixed_back["adapter_model.safetensors"])
    seed = 1 if now["adapter_model.safetensors"] == original["adapter_model.safetensors"] else 2
    assert torch.equal(out, outputs[seed])
    source = original if seed == 1 else mixed_back
    bound = [{k: v for k, v in json.loads(files["adapter_config.json"]).items() if k not in UNBOUND_FIELDS}
             for files in (now, source)]
    assert bound[0] == bound[1]  # and the config's fields are that save's (the base reference may differ)
