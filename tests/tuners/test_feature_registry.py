"""One feature-map registry: spec strings, canonical specs, and a user's registered map inside NTKConfig
through save and load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tuner_models import build, inputs_for, randomize_adapter

from ntk_attention import FeatureMap, NTKConfig, feature_map_names, get_feature_map, register_feature_map


@register_feature_map("test-squared-relu")
class SquaredReluFeatureMap(FeatureMap):
    """phi(x) = relu(x * sqrt(scale))^2 + eps, with a width option."""

    def __init__(self, width: int = 1, eps: float = 1e-3):
        self.width, self.eps = width, eps

    def feature_dim(self, head_dim: int) -> int:
        return head_dim * self.width

    def __call__(self, x, scale):
        y = torch.relu(x.float() * scale**0.5) ** 2 + self.eps
        return y.repeat_interleave(self.width, -1)

    def options(self) -> dict:
        return {"width": self.width, "eps": self.eps}


@pytest.mark.parametrize(
    "spec, canonical",
    [("elu", "elu"), ("random", "random:seed=0"), ("random:64", "random:num_features=64:seed=0"),
     ("random:num_features=32:seed=7", "random:num_features=32:seed=7"), ("taylor:degree=1", "taylor:degree=1"),
     ("taylor:1", "taylor:degree=1"), ("test-squared-relu:width=2", "test-squared-relu:eps=0.001:width=2")],
)
def test_specs_and_their_canonical_form(spec, canonical):
    fmap = get_feature_map(spec)
    assert fmap.spec() == canonical
    assert get_feature_map(canonical).spec() == canonical
    assert NTKConfig(feature_map=spec).feature_map == canonical


def test_keyword_calls_still_work():
    assert get_feature_map("random", num_features=16, seed=3).spec() == "random:num_features=16:seed=3"
    assert get_feature_map("taylor", degree=None).spec() == "taylor:degree=2"  # None means "not given"
    with pytest.raises(ValueError, match="both in the spec"):
        get_feature_map("random:num_features=8", num_features=16)


@pytest.mark.parametrize("spec, message", [("cosine", "unknown feature_map 'cosine'"), ("random:64:128", "expected key=value"),
                                           ("random:seed=1:seed=2", "repeated option"), ("taylor:degree=3", "degree must be 1 or 2"),
                                           ("elu:x=1", "takes no arguments"), ("random:num_features=x", "num_features must be a positive int")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_feature_map(spec)


def test_registration_rules():
    assert {"elu", "random", "taylor", "test-squared-relu"} <= set(feature_map_names())
    register_feature_map("test-squared-relu")(SquaredReluFeatureMap)  # the same class again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        @register_feature_map("elu")
        class Other(FeatureMap):
            pass
    with pytest.raises(ValueError, match="without ':' or '='"):
        register_feature_map("a:b")
    with pytest.raises(TypeError, match="FeatureMap subclasses"):
        register_feature_map("x")(int)
    with pytest.raises(ValueError, match="register a FeatureMap subclass"):
        get_feature_map(lambda x: x).spec()


def test_a_users_feature_map_trains_saves_and_loads_by_name(tmp_path):
    model = get_peft_model(build("llama-gqa"), NTKConfig(feature_map="test-squared-relu:width=2"))
    assert model.get_base_model().model.layers[0].self_attn.attention_adapter.ntk_state["default"].z.shape == (4, 32, 16)
    randomize_adapter(model)
    batch = {k: v for k, v in inputs_for("llama-gqa").items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feature_map"] == "test-squared-relu:eps=0.001:width=2"
    loaded = PeftModel.from_pretrained(build("llama-gqa"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_random_without_a_count_has_as_many_features_as_the_head_and_legacy_files_keep_256():
    from ntk_attention.tuners.legacy import legacy_config

    fmap = get_feature_map("random")
    assert [fmap.feature_dim(d) for d in (16, 64)] == [16, 64]
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(fmap(x, 0.25), get_feature_map("random:num_features=16")(x, 0.25), rtol=0, atol=0)
    old = {"method": "ntk", "library_version": "0.1.0", "feature_map": "random", "num_features": None, "feature_seed": 0}
    assert legacy_config(old, "old/adapter_config.json").feature_map == "random:num_features=256:seed=0"


def test_the_default_is_random_features_and_files_without_the_field_are_not_guessed(tmp_path):
    """0.2.0 changed the default map from elu: a file that states no map would otherwise load as the
    new one and give other outputs with the same weights."""
    from ntk_attention.tuners.legacy import legacy_config
    from ntk_attention.tuners.ntk.config import fold_feature_options

    assert NTKConfig().feature_map == "random:seed=0"
    assert fold_feature_options({"num_features": 16}) == {"feature_map": "random:num_features=16:seed=0"}  # a count alone
    old = {"method": "ntk", "library_version": "0.1.0"}  # before the PEFT route elu was the default
    assert legacy_config(old, "old/adapter_config.json").feature_map == "elu"
    model = build("llama-gqa")
    get_peft_model(model, NTKConfig(feature_map="elu")).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    del data["feature_map"]
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"records no feature_map, whose default has changed \('elu' before 0.2.0"):
        PeftModel.from_pretrained(build("llama-gqa"), tmp_path)
