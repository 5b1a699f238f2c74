"""One registry of training methods and one declaration of train's options, read by train, compare
and the CLI help."""

from __future__ import annotations

import subprocess
import sys

from ntk_attention.cli import build_parser
from ntk_attention.training import methods
from ntk_attention.training.compare.runs import train_command
from ntk_attention.training.compare.variants import default_grid, parse_variant
from ntk_attention.training.options import run_option_names
from ntk_attention.tuners import NTKConfig, PrefixConfig


def test_registry_defaults_come_from_the_config_classes():
    assert methods.NAMES == ("ntk", "prefix", "lora", "full", "head")
    for name, config_class in (("ntk", NTKConfig), ("prefix", PrefixConfig)):
        method = methods.get_method(name)
        assert method.default_learning_rate == config_class.default_learning_rate
        assert method.learning_rate_grid == tuple(config_class.learning_rate_grid)
        assert method.takes_config
    assert {name: (m.default_learning_rate, m.learning_rate_grid) for name, m in methods.REGISTRY.items()} == {
        "ntk": (3e-3, (1e-3, 3e-3, 1e-2)), "prefix": (3e-2, (3e-3, 1e-2, 3e-2)), "lora": (1e-3, (3e-4, 1e-3, 3e-3)),
        "full": (5e-5, (2e-5, 5e-5, 1e-4)), "head": (1e-2, (3e-3, 1e-2, 3e-2))}
    assert not methods.get_method("full").takes_config and default_grid("lora") == [3e-4, 1e-3, 3e-3]


def test_train_reads_the_registry(capsys):
    parser, _ = build_parser(["train"])
    text = parser.format_help()
    for method in methods.REGISTRY.values():
        assert f"{method.name} {method.default_learning_rate:g}" in text
    compare, _ = build_parser(["compare"])
    assert "prefix 0.003,0.01,0.03" in compare.format_help()


def test_compare_forwards_exactly_trains_options(tmp_path):
    """Every option compare takes from train is passed on when given, and nothing when not."""
    train, _ = build_parser(["train"])
    compare, _ = build_parser(["compare"])
    train_dests = set(vars(train.parse_args([]))) - {"_run"}
    assert set(run_option_names()) <= train_dests and set(run_option_names()) <= set(vars(compare.parse_args([])))
    # train's own options are the method, its learning rates, the seed and the output
    assert train_dests - set(run_option_names()) == {"method", "config", "init_from", "lr", "seed", "output_dir",
                                                     "resume", "result_json"}
    args = compare.parse_args([])
    bare = train_command(args, parse_variant("ntk"), [1e-3], 0, str(tmp_path))
    assert not set(bare) & {"--" + name.replace("_", "-") for name in run_option_names()}
    given = ["--num-labels", "3", "--split-seed", "4", "--no-group-by-length", "--task", "classification",
             "--epochs", "0.5", "--max-length", "64"]
    command = train_command(compare.parse_args(given), parse_variant("ntk"), [1e-3], 0, str(tmp_path))
    forwarded = train.parse_args(command[command.index("train") + 1:])
    assert (forwarded.num_labels, forwarded.split_seed, forwarded.group_by_length, forwarded.epochs,
            forwarded.task, forwarded.max_length) == (3, 4, False, 0.5, "classification", 64)


def test_evaluate_does_not_import_train():
    """The import cycle train <-> evaluate is gone: eval loads without the train command's module."""
    code = ("import sys, ntk_attention.training.evaluate; "
            "assert 'ntk_attention.training.train' not in sys.modules, 'evaluate imported train'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_peft_method_gets_the_same_task_wrapper():
    """LoRA, NTK and prefix choose PEFT's task wrapper by one rule: the base's inputs and head."""
    import peft
    import transformers as tf

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
    bases = {  # task: (a base, its head, PEFT's wrapper, LoRA's targets)
        "classification": (lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, **small)), ["classifier"],
                           peft.PeftModelForSequenceClassification, ["query", "value"]),
        "causal-lm": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, **small)), [], peft.PeftModelForCausalLM,
                      ["q_proj", "v_proj"]),
        "image-classification": (lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, **small)),
                                 ["classifier"], peft.PeftModel, ["q_proj", "v_proj"]),
    }
    for task, (make, head, wrapper, targets) in bases.items():
        for name, options in (("lora", {"target_modules": targets}), ("ntk", {}), ("prefix", {})):
            model = methods.build_method_model(make(), name, methods.method_config(name, task, options), head)
            assert type(model) is wrapper, (task, name, type(model).__name__)
