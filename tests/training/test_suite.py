"""Suite files (`ntk-attn compare --suite`): reading and checking them, turning each data layout into
train's columns, the metrics (MCC, perplexity, exact match), and suite.json across tasks."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntk_attention import cli
from ntk_attention.training import suite as S
from ntk_attention.training.fit import matthews_correlation
from ntk_attention.tuners.config import resolve_reference

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/ scripts and committed results


def write_suite(path, model, body: str):
    path.write_text(f'model = "{model}"\n' + body)
    return str(path)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def pair_data(tmp_path):
    """An RTE-like task: premise / hypothesis pairs, string labels; the hypothesis decides the label."""
    root = tmp_path / "data"
    (root / "rte").mkdir(parents=True)
    words = ["good", "bad", "great", "awful", "fine", "poor"]
    def rows(n, offset):
        return [{"premise": f"the film was {words[(i + offset) % 6]}", "hypothesis": f"it is {words[i % 2]}",
                 "label": ["entailment", "not_entailment"][i % 2]} for i in range(n)]
    jsonl(root / "rte" / "train.jsonl", rows(40, 0))
    jsonl(root / "rte" / "val.jsonl", rows(12, 3))
    return root


PAIR_SUITE = """name = "tiny-rte"
task = "classification"
metric = "accuracy"
variants = ["head", "ntk", "ntk-m4=ntk:virtual_prefix_length=4", "lora"]
main_variants = ["ntk"]
seeds = [0, 1]
[lr_grid]
head = [1e-2]
ntk = [1e-3]
lora = [1e-3]
[data]
train = "rte/train.jsonl"
eval = "rte/val.jsonl"
text = "premise"
text_pair = "hypothesis"
label_names = ["entailment", "not_entailment"]
[budget]
validation = 8
epochs = 1
batch_size = 8
max_length = 32
"""


def suite_argv(tmp_path, model, data_root, body: str = PAIR_SUITE, jobs: int = 2):
    """``compare --suite`` on a suite file written from ``body``, with its results and work folders."""
    suite = write_suite(tmp_path / "rte.toml", model, body)
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["compare", "--suite", suite, "--data-root", str(data_root), "--out-dir", str(out), "--work-dir", str(work),
            "--jobs", str(jobs), "--threads", "1"]
    return argv, out, work


def test_pair_suite_end_to_end_writes_suite_json(tmp_path, tiny_bert, pair_data):
    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data)
    assert cli.main(argv) == 0
    record = json.loads((out / "tiny-rte.json").read_text())
    assert record["suite"]["metric"] == "accuracy" and record["metric"] == "accuracy"
    methods = record["methods"]
    assert methods["ntk"]["seeds"] == [0, 1]  # a main row runs every seed
    assert methods["ntk-m4"]["seeds"] == [0] and methods["lora"]["seeds"] == [0]  # the others the first
    train_rows = [json.loads(line) for line in (work / "tiny-rte" / "data" / "train.jsonl").read_text().splitlines()]
    assert train_rows[1] == {"text": "the film was bad", "text_pair": "it is bad", "label": 1}
    run = json.loads((work / "tiny-rte" / "ntk" / "seed0" / "adapter" / "training_run.json").read_text())
    assert run["text_pair_column"] == "text_pair"
    # the recorded command is the one given: what the suite fixes is not spelled out beside --suite
    command = json.loads((out / "tiny-rte.json").read_text())["command"]
    assert command.startswith("ntk-attn compare --suite ") and "--data-root" in command
    assert not any(word in command.split() for word in ("--variants", "--lr-grid", "--epochs"))
    summary = json.loads((out / "suite.json").read_text())
    task = summary["tasks"]["tiny-rte"]
    assert task["metric"] == "accuracy" and task["higher_is_better"] is True and task["model"] == tiny_bert
    ntk = task["methods"]["ntk"]
    assert ntk["method"] == "ntk" and ntk["seeds"] == 2 and ntk["trainable_params"] > 0
    assert ntk["mean"] == pytest.approx(np.mean(ntk["per_seed"])) and ntk["std"] == pytest.approx(np.std(ntk["per_seed"], ddof=1))
    # each seed's validation score at the chosen rate: the first seed's is its grid's
    row = methods["ntk"]
    assert len(row["validation_per_seed"]) == 2 and row["validation_per_seed"][0] == row["validation_grid"]["0.001"]
    for seed, value in zip(row["seeds"], row["validation_per_seed"]):
        run = json.loads((work / "tiny-rte" / "ntk" / f"seed{seed}" / "result.json").read_text())
        assert value == run["after"]["validation"]["accuracy"]
    assert task["methods"]["head"]["trainable_params"] == 0
    assert ntk["grid_edge"] == "one rate"  # the file's grids have one rate each: nothing was chosen
    assert "tiny-rte ntk (0.001, one rate)" in (out / "suite.md").read_text()
    assert "| 0.001 (one rate) |" in (out / "tiny-rte.md").read_text()
    assert "| ntk |" in (out / "suite.md").read_text()
    assert task["title"] == "tiny-rte" and task["task"] == "classification"  # no title in the file: its name
    lead = S.lead_table(summary).splitlines()
    assert lead[2].startswith(f"| tiny-rte | {task['methods']['head']['mean']:.3f} | ")
    assert "ntk_vs_lora" in task and f"**{task['ntk_vs_lora']['difference']:+.3f}**" in lead[2]
    assert (out / "suite.md").read_text().startswith("\n".join(lead))
    assert (out / "tiny-rte-params.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"
    # the yardstick: the NTK variant at or under LoRA's count that is best on validation, minus LoRA on dev
    gap = task["ntk_vs_lora"]
    under = [label for label, m in methods.items() if m["method"] == "ntk"
             and m["trainable_params_excl_head"] <= 1.05 * methods["lora"]["trainable_params_excl_head"]]
    assert gap["ntk"] in under
    assert gap["difference"] == pytest.approx(methods[gap["ntk"]]["dev_accuracy"] - methods["lora"]["dev_accuracy"])
    # --only runs a subset; what the suite fixes cannot be set beside it
    with pytest.raises(ValueError, match="--epochs"):
        cli.main(argv + ["--epochs", "3"])
    with pytest.raises(ValueError, match="not variants"):
        cli.main(argv + ["--only", "nope"])


def test_a_suite_call_is_planned_from_the_file_as_written(tmp_path, tiny_bert, pair_data):
    from ntk_attention.training import compare

    def planned(body, *extra):
        argv, _, _ = suite_argv(tmp_path, tiny_bert, pair_data, body)
        parser, rest = cli.build_parser(argv + list(extra))
        return compare.plan(parser.parse_args(rest))

    # rates keep every digit the file gives (they once went through '%g', six significant digits)
    call = planned(PAIR_SUITE.replace("ntk = [1e-3]", "ntk = [1.2345678e-3]\n\"ntk-m4\" = [3e-3]"), "--only", "ntk-m4")
    assert [v.label for v in call.rows] == ["head", "ntk", "ntk-m4", "lora"]  # the result's rows, in the file's order
    assert [v.label for v in call.variants] == ["ntk-m4"] and call.variants[0].seeds == 1  # not a main row: one seed
    assert call.rows_grid == {"head": [1e-2], "ntk": [1.2345678e-3], "ntk-m4": [3e-3], "lora": [1e-3]}
    assert call.grid == {"ntk-m4": [3e-3]}
    with pytest.raises(ValueError, match=r"\[lr_grid\] 'prefix': names none of the variants"):
        planned(PAIR_SUITE.replace("lora = [1e-3]", "lora = [1e-3]\nprefix = [1e-2]"))


def test_results_outlive_the_work_dir_and_only_updates_rows(tmp_path, tiny_bert, pair_data):
    """The work dir is a cache (a new machine has none): rows of the earlier result that are today's
    variants are kept without training; a row whose resolved defaults changed is not, nor one whose grid
    lost its rates (a widened grid keeps it, its missing rates named)."""
    body = PAIR_SUITE.replace('"ntk-m4=ntk:virtual_prefix_length=4", ', "").replace("seeds = [0, 1]", "seeds = [0]")
    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data, body, jobs=1)
    assert cli.main(argv) == 0
    first = json.loads((out / "tiny-rte.json").read_text())
    assert first["methods"]["ntk"]["method_fields"]["feature_map"] == "random:seed=0"
    assert first["methods"]["ntk"]["measured_by"]["command"] == first["command"]
    shutil.rmtree(work)
    # every row kept: nothing trains, the numbers are the earlier ones, and --only drops no row
    assert cli.main(argv + ["--only", "lora"]) == 0
    again = json.loads((out / "tiny-rte.json").read_text())
    assert again["methods"] == first["methods"] and not (work / "tiny-rte" / "lora").exists()
    assert "Kept from an earlier call" in (out / "tiny-rte.md").read_text()
    # a row made under another default (elu, before 0.2.0) is not today's ntk: it runs again
    stale = json.loads((out / "tiny-rte.json").read_text())
    stale["methods"]["ntk"]["method_fields"]["feature_map"] = "elu"
    (out / "tiny-rte.json").write_text(json.dumps(stale))
    assert cli.main(argv + ["--only", "ntk"]) == 0
    assert (work / "tiny-rte" / "ntk" / "seed0" / "result.json").is_file()
    rerun = json.loads((out / "tiny-rte.json").read_text())["methods"]
    assert rerun["ntk"]["method_fields"]["feature_map"] == "random:seed=0" and rerun["lora"] == first["methods"]["lora"]
    # a widened grid keeps a row this call does not run, at its rates, and the reports name the rate not run
    (tmp_path / "rte.toml").write_text((tmp_path / "rte.toml").read_text().replace("lora = [1e-3]", "lora = [1e-3, 3e-3]"))
    assert cli.main(argv + ["--only", "head"]) == 0
    widened = json.loads((out / "tiny-rte.json").read_text())
    assert widened["methods"]["lora"] == first["methods"]["lora"] and widened["lr_grid"]["lora"] == [1e-3, 3e-3]
    assert not (work / "tiny-rte" / "lora").exists()
    assert "lora: rates 0.003 of the suite's grid not run yet" in (out / "tiny-rte.md").read_text()
    summary = json.loads((out / "suite.json").read_text())
    assert summary["tasks"]["tiny-rte"]["methods"]["lora"]["rates_not_run"] == [3e-3]
    assert "tiny-rte lora (0.003)" in (out / "suite.md").read_text()
    # a grid that no longer holds the row's rates drops it (and names it) instead of reporting it as today's
    (tmp_path / "rte.toml").write_text((tmp_path / "rte.toml").read_text().replace("lora = [1e-3, 3e-3]", "lora = [3e-3]"))
    assert cli.main(argv + ["--only", "head"]) == 0
    assert set(json.loads((out / "tiny-rte.json").read_text())["methods"]) == {"head", "ntk"}


def test_a_row_short_of_seeds_runs_only_the_seeds_it_lacks(tmp_path, tiny_bert, pair_data):
    """A main row measured at the first seed (its work dir gone) keeps that seed and its grid when the
    suite asks for more seeds; only the missing seeds train, at the chosen rate, and the row equals the
    one a fresh call at every seed makes."""
    body = PAIR_SUITE.replace("ntk = [1e-3]", "ntk = [1e-3, 3e-3]")
    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data, body.replace("seeds = [0, 1]", "seeds = [0]"), jobs=1)
    argv += ["--only", "ntk"]
    assert cli.main(argv) == 0
    record = json.loads((out / "tiny-rte.json").read_text())
    first = record["methods"]["ntk"]
    assert first["validation_per_seed"] == [first["validation_grid"][f"{first['learning_rate']:g}"]]
    del record["methods"]["ntk"]["validation_per_seed"]  # as rows written before they were kept
    (out / "tiny-rte.json").write_text(json.dumps(record))
    shutil.rmtree(work)
    (tmp_path / "rte.toml").write_text((tmp_path / "rte.toml").read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    assert cli.main(argv) == 0
    assert not (work / "tiny-rte" / "ntk" / "seed0").exists() and (work / "tiny-rte" / "ntk" / "seed1" / "result.json").is_file()
    extended = json.loads((out / "tiny-rte.json").read_text())["methods"]["ntk"]
    assert extended["seeds"] == [0, 1] and extended["validation_grid"] == first["validation_grid"]
    assert extended["dev_accuracy_per_seed"][0] == first["dev_accuracy_per_seed"][0]
    assert extended["earlier_seeds"] == [{"seeds": [0], "measured_by": first["measured_by"]}]
    assert "ntk: seeds [0] kept from an earlier call" in (out / "tiny-rte.md").read_text()
    (tmp_path / "fresh").mkdir()
    fresh_argv, fresh_out, _ = suite_argv(tmp_path / "fresh", tiny_bert, pair_data, body, jobs=1)
    assert cli.main(fresh_argv + ["--only", "ntk"]) == 0
    fresh = json.loads((fresh_out / "tiny-rte.json").read_text())["methods"]["ntk"]
    for key in ("dev_accuracy", "dev_accuracy_std", "dev_accuracy_per_seed", "dev_loss_per_seed", "learning_rate",
                "best_epoch_per_seed", "validation_per_seed"):
        assert extended[key] == pytest.approx(fresh[key]), key


def test_a_widened_grid_trains_only_the_rates_it_adds(tmp_path, tiny_bert, pair_data):
    """A row whose grid gained rates (its work dir gone) trains its first seed at the new rates only and
    chooses on validation among old and new: an earlier rate that still wins keeps the row's seeds; a
    new rate that wins makes the row a fresh call at that rate would make."""
    body = PAIR_SUITE.replace("ntk = [1e-3]", "ntk = [1e-3, 3e-3]")
    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data, body.replace("ntk = [1e-3, 3e-3]", "ntk = [1e-3]"), jobs=1)
    argv += ["--only", "ntk"]
    assert cli.main(argv) == 0
    result = out / "tiny-rte.json"
    first = json.loads(result.read_text())
    shutil.rmtree(work)
    suite = tmp_path / "rte.toml"
    suite.write_text(suite.read_text().replace("ntk = [1e-3]", "ntk = [1e-3, 3e-3]"))

    def widen(earlier_score: float) -> dict:
        """The row after widening, its 1e-3 validation score set to ``earlier_score`` beforehand."""
        record = json.loads(json.dumps(first))
        record["methods"]["ntk"]["validation_grid"]["0.001"] = earlier_score
        result.write_text(json.dumps(record))
        assert cli.main(argv) == 0
        assert not (work / "tiny-rte" / "ntk" / "seed0").exists()  # the earlier rate did not train again
        assert (work / "tiny-rte" / "ntk" / "seed0-more-rates" / "result.json").is_file()
        return json.loads(result.read_text())["methods"]["ntk"]

    kept = widen(2.0)  # above any accuracy: 1e-3 still wins
    row = first["methods"]["ntk"]
    assert kept["learning_rate"] == 1e-3 and kept["dev_accuracy_per_seed"] == row["dev_accuracy_per_seed"]
    assert list(kept["validation_grid"]) == ["0.001", "0.003"] and kept["validation_grid"]["0.001"] == 2.0
    assert kept["earlier_rates"] == [{"rates": [1e-3], "measured_by": row["measured_by"]}]
    assert kept["earlier_seeds"] == [{"seeds": [0, 1], "measured_by": row["measured_by"]}]
    assert not (work / "tiny-rte" / "ntk" / "seed1").exists()
    assert "ntk: rates 0.001 of its validation grid measured by" in (out / "tiny-rte.md").read_text()

    moved = widen(-1.0)  # below any accuracy: 3e-3 wins, and seed 1 trains at it
    assert moved["learning_rate"] == 3e-3 and moved["seeds"] == [0, 1] and "earlier_seeds" not in moved
    assert moved["validation_grid"]["0.003"] == kept["validation_grid"]["0.003"]
    (tmp_path / "fresh").mkdir()
    fresh_body = body.replace("ntk = [1e-3, 3e-3]", "ntk = [3e-3]")
    fresh_argv, fresh_out, _ = suite_argv(tmp_path / "fresh", tiny_bert, pair_data, fresh_body, jobs=1)
    assert cli.main(fresh_argv + ["--only", "ntk"]) == 0
    fresh = json.loads((fresh_out / "tiny-rte.json").read_text())["methods"]["ntk"]
    for key in ("dev_accuracy", "dev_accuracy_per_seed", "dev_loss_per_seed", "learning_rate", "best_epoch_per_seed",
                "validation_per_seed"):
        assert moved[key] == pytest.approx(fresh[key]), key
    # a grid that drops an earlier rate is another grid: the row trains again from the start
    suite.write_text(suite.read_text().replace("ntk = [1e-3, 3e-3]", "ntk = [3e-3, 1e-2]"))
    assert cli.main(argv) == 0
    assert (work / "tiny-rte" / "ntk" / "seed0" / "result.json").is_file()


def test_earlier_validation_per_seed_is_known_only_where_it_was_measured():
    """A row written before rows kept each seed's validation score: a one-seed row has it in its grid; a
    row of several seeds knows its first seed's only, so it gets none (not a list shorter than its seeds)."""
    from ntk_attention.training.compare.resume import earlier_validation

    grid = {"0.001": 0.4, "0.003": 0.5}
    assert earlier_validation({"seeds": [0, 1], "learning_rate": 1e-3, "validation_grid": grid,
                               "validation_per_seed": [0.4, 0.45]}) == [0.4, 0.45]
    assert earlier_validation({"seeds": [0], "learning_rate": 3e-3, "validation_grid": grid}) == [0.5]
    assert earlier_validation({"seeds": [0, 1], "learning_rate": 1e-3, "validation_grid": grid}) is None


def test_jobs_bounds_train_processes_and_runs_a_rows_later_seeds_together(tmp_path, tiny_bert, pair_data, monkeypatch):
    """--jobs 2: the seeds after a row's first train at the same time, and the call never has more than two
    train processes, however rows and seeds overlap."""
    import threading
    import time

    from ntk_attention.training.compare import runs

    running, most, spans, lock, real_run = [0], [0], {}, threading.Lock(), subprocess.run
    def counted(command, **kwargs):
        if "--output-dir" not in command:  # git, for the provenance
            return real_run(command, **kwargs)
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        start = time.monotonic()
        try:
            return real_run(command, **kwargs)
        finally:
            with lock:
                running[0] -= 1
                spans[command[command.index("--output-dir") + 1]] = (start, time.monotonic())
    monkeypatch.setattr(runs.subprocess, "run", counted)
    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data, PAIR_SUITE.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"), jobs=2)
    assert cli.main(argv + ["--only", "ntk", "lora"]) == 0
    methods = json.loads((out / "tiny-rte.json").read_text())["methods"]
    assert methods["ntk"]["seeds"] == [0, 1, 2] and methods["lora"]["seeds"] == [0]
    assert len(spans) == 4 and most[0] == 2 and running[0] == 0
    one, two = (spans[str(work / "tiny-rte" / "ntk" / f"seed{seed}")] for seed in (1, 2))
    assert one[0] < two[1] and two[0] < one[1]  # seeds 1 and 2 overlapped


def test_a_second_call_on_the_same_result_file_is_refused_while_one_runs(tmp_path, tiny_bert, pair_data):
    """Two calls at once would each write back only the rows they read at their start: the second is refused."""
    import filelock

    argv, out, work = suite_argv(tmp_path, tiny_bert, pair_data, jobs=1)
    out.mkdir()
    with filelock.FileLock(str(out / ".tiny-rte.json.lock")):  # as a running call holds it
        with pytest.raises(ValueError, match="another compare call is writing it"):
            cli.main(argv + ["--only", "head"])
    assert not (out / "tiny-rte.json").exists() and not (work / "tiny-rte" / "head").exists()
    assert cli.main(argv + ["--only", "head"]) == 0  # released: the call runs


def test_an_unreadable_earlier_result_is_refused_not_overwritten(tmp_path, tiny_bert, pair_data):
    argv, out, _ = suite_argv(tmp_path, tiny_bert, pair_data)
    out.mkdir()
    (out / "tiny-rte.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tiny-rte.json cannot be read as an earlier result"):
        cli.main(argv + ["--only", "head"])
    assert (out / "tiny-rte.json").read_text() == "{not json"


def test_language_modelling_suite_reports_perplexity(tmp_path, tiny_llama):
    root = tmp_path / "data"
    root.mkdir()
    articles = "".join(f" \n = Article {i} = \n \n the cat sat on mat {i} . the dog ran far {i} . \n" * 1 for i in range(12))
    (root / "wiki.raw").write_text(articles * 3)
    suite = write_suite(tmp_path / "wiki.toml", tiny_llama, """name = "tiny-wiki"
task = "language-modeling"
metric = "perplexity"
variants = ["base", "ntk"]
seeds = [0]
[lr_grid]
ntk = [1e-3]
[data]
train = "wiki.raw"
format = "wikitext-articles"
holdout = { rows = 10, seed = 0 }
text = "text"
[budget]
validation = 4
epochs = 1
batch_size = 2
max_length = 16
""")
    out = tmp_path / "results"
    assert cli.main(["compare", "--suite", suite, "--data-root", str(root), "--out-dir", str(out),
                     "--work-dir", str(tmp_path / "work"), "--threads", "1"]) == 0
    record = json.loads((out / "tiny-wiki.json").read_text())
    for label in ("base", "ntk"):
        m = record["methods"][label]
        assert m["dev_perplexity"] == pytest.approx(math.exp(m["dev_loss"]))
    summary = json.loads((out / "suite.json").read_text())["tasks"]["tiny-wiki"]
    assert summary["metric"] == "perplexity" and summary["higher_is_better"] is False


def test_math_templates_build_prompt_and_answer(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([
        {"sQuestion": " Joan had 70 shells and gave 27 away. How many are left? ", "lEquations": ["X = 70 - 27"],
         "lSolutions": ["43"]},
        {"sQuestion": "What is 2 times 3?", "lEquations": ["X=2*3"], "lSolutions": [6.0]},
    ] * 3))
    suite_file = tmp_path / "m.toml"
    suite_file.write_text("""name = "m"
task = "causal-lm"
metric = "exact_match"
model = "x"
variants = ["lora"]
[data]
train = "m.json"
holdout = { rows = 2, seed = 3 }
prompt = "{sQuestion}"
answer = "{lEquations[0]}\\n#### {lSolutions[0]:g}"
""")
    suite = S.load_suite(str(suite_file))
    train, evaluation = S.prepare_data(suite, str(tmp_path), str(tmp_path / "out"))
    rows = [json.loads(line) for path in (train, evaluation) for line in open(path)]
    assert len(rows) == 6 and sum(1 for _ in open(evaluation)) == 2
    assert {"question": "Joan had 70 shells and gave 27 away. How many are left?", "answer": "X = 70 - 27\n#### 43"} in rows
    assert {"question": "What is 2 times 3?", "answer": "X=2*3\n#### 6"} in rows
    # the same seed carves the same reported rows; the files are not rewritten when nothing changed
    before = open(evaluation).read()
    assert S.prepare_data(suite, str(tmp_path), str(tmp_path / "out"))[1] == evaluation and open(evaluation).read() == before


def test_headerless_tsv_and_label_names_with_booleans(tmp_path):
    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (tmp_path / "boolq.jsonl").write_text('{"question": "q1", "passage": "p1", "label": true}\n'
                                          '{"question": "q2", "passage": "p2", "label": false}\n' * 3)
    base = 'model = "x"\nvariants = ["ntk"]\ntask = "classification"\n'
    cola = tmp_path / "cola.toml"
    cola.write_text(base + 'name = "cola"\nmetric = "mcc"\n[data]\ntrain = "cola.tsv"\neval = "cola.tsv"\n'
                    'columns = ["source", "label", "marker", "sentence"]\ntext = "sentence"\n')
    train, _ = S.prepare_data(S.load_suite(str(cola)), str(tmp_path), str(tmp_path / "cola"))
    assert [json.loads(line) for line in open(train)] == [{"text": "The cat sat.", "label": 1}, {"text": "Cat the sat.", "label": 0}]
    boolq = tmp_path / "boolq.toml"
    boolq.write_text(base + 'name = "boolq"\nmetric = "accuracy"\n[data]\ntrain = "boolq.jsonl"\nholdout = { rows = 2, seed = 0 }\n'
                     'text = "question"\ntext_pair = "passage"\nlabel_names = [false, true]\n')
    train, _ = S.prepare_data(S.load_suite(str(boolq)), str(tmp_path), str(tmp_path / "boolq"))
    assert {json.loads(line)["label"] for line in open(train)} == {0, 1}
    bad = tmp_path / "bad.toml"
    bad.write_text(base + 'name = "bad"\nmetric = "accuracy"\n[data]\ntrain = "boolq.jsonl"\neval = "boolq.jsonl"\n'
                   'text = "question"\nlabel_names = ["yes", "no"]\n')
    with pytest.raises(ValueError, match="label True is not one of label_names"):
        S.prepare_data(S.load_suite(str(bad)), str(tmp_path), str(tmp_path / "bad"))


@pytest.mark.parametrize("body,message", [
    ('name = "a"\ntask = "classification"\nmetric = "perplexity"\nvariants = ["ntk"]\n[data]\ntrain = "t"\neval = "e"\n',
     "metric for task 'classification'"),
    ('name = "a"\ntask = "classification"\nmetric = "accuracy"\nvariants = ["ntk"]\nepochs = 2\n[data]\ntrain = "t"\neval = "e"\n',
     "unknown fields \\['epochs'\\]"),
    ('name = "a"\ntask = "classification"\nmetric = "accuracy"\nvariants = ["ntk"]\n[data]\ntrain = "t"\n',
     "needs 'eval'"),
    ('name = "a"\ntask = "classification"\nmetric = "accuracy"\nvariants = ["ntk"]\nmain_variants = ["lora"]\n[data]\ntrain = "t"\neval = "e"\n',
     "main_variants \\['lora'\\]"),
    ('name = "a b"\ntask = "classification"\nmetric = "accuracy"\nvariants = ["ntk"]\n[data]\ntrain = "t"\neval = "e"\n',
     "plain file name"),
    ('name = "a"\ntitle = "a | b"\ntask = "classification"\nmetric = "accuracy"\nvariants = ["ntk"]\n[data]\ntrain = "t"\neval = "e"\n',
     "title must be one line"),
])
def test_bad_suite_files_name_the_field(tmp_path, body, message):
    path = tmp_path / "s.toml"
    path.write_text('model = "x"\n' + body)
    with pytest.raises(ValueError, match=message) as error:
        S.load_suite(str(path))
    assert str(path) in str(error.value)


def test_missing_data_file_and_package_are_named(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('model = "pkg:no_such_package_here"\nname = "a"\ntask = "classification"\nmetric = "accuracy"\n'
                    'variants = ["ntk"]\n[data]\ntrain = "missing.jsonl"\neval = "e.jsonl"\n')
    suite = S.load_suite(str(path))
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        S.prepare_data(suite, str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no_such_package_here"):
        resolve_reference(suite.model)


def test_every_committed_suite_reads_and_its_variants_build():

    from ntk_attention.training.compare.variants import assign_grid, check_configs, parse_variant

    files = sorted((ROOT / "benchmarks" / "suites").glob("*.toml"))
    assert len(files) >= 10
    for file in files:
        suite = S.load_suite(str(file))
        assert suite.name == file.stem
        variants = [parse_variant(spec) for spec in suite.variants]
        check_configs(variants, suite.task)  # every config field exists
        assign_grid(suite.lr_grid.items(), variants, source=str(file))  # every grid names a variant or its method


def test_matthews_correlation():
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    predicted = np.array([0, 1, 1, 1, 0, 0, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_correlation(predicted, labels) == pytest.approx(expected)
    assert matthews_correlation(labels, labels) == pytest.approx(1.0)
    assert matthews_correlation(np.zeros(8, dtype=int), labels) == 0.0  # constant prediction
    three = np.array([0, 1, 2, 2, 1, 0])
    assert matthews_correlation(three, three) == pytest.approx(1.0)


def test_ntk_against_prefix_keeps_full_state_variants_only():
    """A low-rank NTK trains fewer numbers than it holds at decode; against a prefix's KV cache it must not count."""
    from ntk_attention.training.suite import ntk_against

    def row(method, params, validation, dev, **config):
        return {"method": method, "trainable_params_excl_head": params, "learning_rate": 1e-3, "validation_grid": {"0.001": validation},
                "selection_metric": "accuracy", "dev_accuracy": dev, "config": config}

    methods = {"prefix-m16": row("prefix", 1000, 0.80, 0.78), "ntk": row("ntk", 1040, 0.79, 0.75),
               "ntk-rank8": row("ntk", 300, 0.85, 0.81, rank=8), "ntk-big": row("ntk", 5000, 0.90, 0.90)}
    by_count = ntk_against(methods, True, "accuracy", "prefix-m16")
    assert by_count["ntk"] == "ntk-rank8" and by_count["difference"] == pytest.approx(0.03)
    at_memory = ntk_against(methods, True, "accuracy", "prefix-m16", full_state_only=True)
    assert at_memory["ntk"] == "ntk" and at_memory["difference"] == pytest.approx(-0.03)
    assert ntk_against(methods, True, "accuracy", "lora") is None
    on_dev = ntk_against(methods | {"ntk-small": row("ntk", 200, 0.70, 0.85)}, True, "accuracy", "prefix-m16",
                         score=lambda m: m["dev_accuracy"])
    assert on_dev["ntk"] == "ntk-small" and on_dev["difference"] == pytest.approx(0.07)


def test_selection_check_reads_committed_results_and_compares_choices(tmp_path):
    """benchmarks/selection_check.py: the validation/reported rank correlation over trained rows (ties share a
    rank) and the NTK row chosen on validation against the best on the reported metric, with their gaps."""

    def row(method, params, validation, dev):
        return {"method": method, "trainable_params_excl_head": params, "learning_rate": 1e-3, "seeds": [0],
                "validation_grid": {"0.001": validation}, "selection_metric": "loss", "dev_perplexity": dev, "config": {}}

    record = {"suite": {"name": "lm", "metric": "perplexity", "higher_is_better": False},
              "methods": {"base": {"method": "base", "trainable_params_excl_head": 0, "dev_perplexity": 40.0},
                          "lora": row("lora", 100, 3.0, 20.0), "ntk": row("ntk", 90, 3.2, 26.0),
                          "ntk-kv": row("ntk", 50, 3.2, 24.0), "full": row("full", 10**6, 2.9, 18.0)}}
    (tmp_path / "lm.json").write_text(json.dumps(record))
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": {}}))  # no 'suite' field: skipped
    script = ROOT / "benchmarks" / "selection_check.py"
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(script), "--results", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    task = json.loads(out.read_text())["tasks"]["lm"]
    assert task["rows"] == 4  # base has no validation grid
    # ranks (label order full, lora, ntk, ntk-kv): validation 4, 3, 1.5, 1.5 (a tie); reported 4, 3, 1, 2
    assert task["rank_correlation"] == pytest.approx(3 / math.sqrt(10))
    assert task["chosen"]["ntk"] == "ntk" and task["chosen"]["difference"] == pytest.approx(-6.0)
    assert task["best_reported"]["ntk"] == "ntk-kv" and task["best_reported"]["difference"] == pytest.approx(-4.0)
    assert "| lm | perplexity | 4 | 0.95 | ntk (1 seed) | -6.000 | ntk-kv (1 seed) | -4.000 |" in out.with_suffix(".md").read_text()
    (tmp_path / "lm.json").write_text(json.dumps({**record, "methods": {"lora": record["methods"]["lora"]}}))
    one_row = subprocess.run([sys.executable, str(script), "--results", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
    assert one_row.returncode == 0 and "| lm | perplexity | 1 | n/a |  |  |  |  |" in one_row.stdout  # no correlation, no NTK row
    empty = subprocess.run([sys.executable, str(script), "--results", str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "no suite results" in empty.stderr


def test_epoch_curves_reads_each_runs_trainer_log_at_its_chosen_rate(tmp_path):
    """benchmarks/epoch_curves.py: the validation loss after each epoch from the last checkpoint's trainer
    state of the chosen rate (not another rate's, not an earlier checkpoint's), beside the reported scores."""

    def state(folder, losses):
        folder.mkdir(parents=True)
        log = [{"epoch": e + 1, "eval_loss": loss, "eval_accuracy": 1 - loss} for e, loss in enumerate(losses)]
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"epoch": 0.5, "loss": 9.0}] + log}))

    work = tmp_path / "work"
    state(work / "lora" / "seed0" / "checkpoints" / "lr-0.003" / "checkpoint-9", [0.5])
    state(work / "lora" / "seed0" / "checkpoints" / "lr-0.003" / "checkpoint-18", [0.5, 0.4, 0.35])  # the last: 18 > 9
    state(work / "lora" / "seed0" / "checkpoints" / "lr-0.01" / "checkpoint-18", [0.9, 0.8, 0.7])
    state(work / "ntk" / "seed0" / "checkpoints" / "lr-0.01" / "checkpoint-18", [0.7, 0.6, 0.55])

    def row(rate, em, params):
        return {"seeds": [0], "learning_rate": rate, "trainable_params_excl_head": params, "best_epoch_per_seed": [3.0],
                "dev_exact_match": em, "dev_loss": 0.3, "dev_exact_match_per_seed": [em], "dev_loss_per_seed": [0.3],
                "validation_grid": {f"{rate:g}": 0.4}}
    result = {"metric": "loss", "budget": {"epochs": 3}, "command": "ntk-attn compare ...", "machine": {},
              "methods": {"lora": row(3e-3, 0.25, 100), "ntk": row(1e-2, 0.12, 90)}}
    reference = {"budget": {"epochs": 1}, "methods": {"lora": row(3e-3, 0.2, 100)}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    script = ROOT / "benchmarks" / "epoch_curves.py"
    out = tmp_path / "curves.json"
    done = subprocess.run([sys.executable, str(script), "--work-dir", str(work), "--result", str(tmp_path / "r.json"),
                           "--reference", str(tmp_path / "ref.json"), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows["lora"]["validation_per_epoch"] == [[0.5, 0.4, 0.35]] and rows["ntk"]["validation_per_epoch"] == [[0.7, 0.6, 0.55]]
    assert rows["lora"]["reference"]["reported_exact_match_per_seed"] == [0.2] and "reference" not in rows["ntk"]
    assert "| lora | 0 | 100 | 0.003 | 0.500 | 0.400 | 0.350 | 3 | 0.250 | 0.300 |" in out.with_suffix(".md").read_text()
    # rows that chose their epoch by accuracy get the accuracy curve
    classified = {"lora": {**row(3e-3, 0.25, 100), "selection_metric": "accuracy", "dev_accuracy_per_seed": [0.8]},
                  "ntk": {**row(1e-2, 0.12, 90), "selection_metric": "accuracy", "dev_accuracy_per_seed": [0.7]}}
    for r in classified.values():
        r["dev_accuracy"] = r["dev_accuracy_per_seed"][0]
        del r["dev_exact_match"]
    (tmp_path / "r.json").write_text(json.dumps({**result, "methods": classified}))
    done = subprocess.run([sys.executable, str(script), "--work-dir", str(work), "--result", str(tmp_path / "r.json"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["rows"]["ntk"]["validation_per_epoch"] == [pytest.approx([0.3, 0.4, 0.45])]
    assert "val accuracy ep 3" in out.with_suffix(".md").read_text()
    (tmp_path / "r.json").write_text(json.dumps({**result, "methods": {"ntk": row(3e-3, 0.1, 90)}}))  # a rate never run
    missing = subprocess.run([sys.executable, str(script), "--work-dir", str(work), "--result", str(tmp_path / "r.json"),
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "lr-0.003: no checkpoint-*/trainer_state.json" in missing.stderr


def script_table_rows(*argv: str) -> list[str]:
    """The table rows a benchmarks/ script prints when run from the repository root on the committed results."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) > 2
    return rows


def test_committed_selection_check_is_the_committed_results():
    """benchmarks/results/selection_check.md, which docs/default.md cites, is what the script gives on the committed
    suite results, row by row (rerun it with --out when a row lands)."""
    rows = script_table_rows("benchmarks/selection_check.py", "--results", "benchmarks/results/suite")
    committed = (ROOT / "benchmarks" / "results" / "selection_check.md").read_text()
    assert rows == [line for line in committed.splitlines() if line.startswith("| ")]


def test_committed_epoch_probes_table_is_the_committed_results():
    """docs/default.md's probe table and benchmarks/results/probes/epoch_probes.md are what the script gives on
    the committed probe and suite results (rerun it with --out when a probe lands)."""
    rows = script_table_rows("benchmarks/epoch_probes.py")
    for committed in ("benchmarks/results/probes/epoch_probes.md", "docs/default.md"):
        lines = (ROOT / committed).read_text().splitlines()
        assert all(row in lines for row in rows), committed


def test_epoch_probe_sets_each_row_beside_the_suite_at_the_probes_seeds():
    """The suite's rows are read at the probe's seeds only, and a suite mean over fewer of them is marked."""
    import importlib.util

    script = ROOT / "benchmarks" / "epoch_probes.py"  # a script, not a package module
    spec = importlib.util.spec_from_file_location("epoch_probes", script)
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)

    def row(method, seeds, values, rate=1e-3):
        return {"method": method, "seeds": seeds, "dev_accuracy_per_seed": values, "dev_accuracy": sum(values) / len(values),
                "dev_loss_per_seed": [1 - v for v in values], "dev_loss": 1 - sum(values) / len(values),
                "learning_rate": rate, "trainable_params_excl_head": 1000, "best_epoch_per_seed": [1.0] * len(seeds)}

    suite = {"metric": "accuracy", "higher_is_better": True, "budget": {"epochs": 2},
             "methods": {"lora": row("lora", [0, 1, 2], [0.8, 0.7, 0.1]), "ntk": row("ntk", [0], [0.5])}}
    probe = {"name": "t-epochs6", "budget": {"epochs": 6},
             "methods": {"lora": row("lora", [0, 1], [0.9, 0.8]), "ntk": row("ntk", [0, 1], [0.8, 0.8], 3e-3)}}
    result = probes.compare_probe(probe, suite)
    assert result["rows"]["lora"]["suite"]["per_seed"] == [0.8, 0.7]  # seed 2 did not run in the probe
    assert result["rows"]["ntk"]["suite"]["seeds"] == [0]
    assert result["gap"]["suite"] == pytest.approx(0.5 - 0.75) and result["gap"]["probe"] == pytest.approx(0.8 - 0.85)
    assert result["probe_gap_per_seed"] == pytest.approx([-0.1, 0.0])
    assert result["rows"]["lora"]["suite"]["loss"] == pytest.approx(0.25)  # at seeds 0 and 1, not 2
    assert "(seed 0)" in probes.markdown({"t-epochs6": result}, "cmd")  # a suite mean over fewer seeds is marked
    with pytest.raises(ValueError, match="one NTK row"):
        probes.compare_probe({**probe, "methods": {"lora": probe["methods"]["lora"]}}, suite)


def test_variant_table_groups_rows_by_method_and_size_and_marks_edge_rates():
    """Rows go base/head, LoRA, prefix, NTK, full, each by its count relative to LoRA r = 8 (median over tasks);
    a cell without ± is one seed, and * marks a rate at an edge of its grid."""
    def row(method, params, seeds=1, mean=0.5, edge=None):
        return {"method": method, "trainable_params": params, "mean": mean, "std": 0.02 if seeds > 1 else 0.0,
                "seeds": seeds, "grid_edge": edge}

    small = {"title": "A", "task": "classification", "metric": "accuracy", "higher_is_better": True,
             "methods": {"full": row("full", 10**7, 3), "ntk": row("ntk", 110, 3), "lora": row("lora", 100, 3, 0.8),
                         "head": row("head", 0), "lora-r16": row("lora", 200, edge="upper edge"),
                         "ntk-rank8": row("ntk", 50, edge="one rate"), "lora-r1": row("lora", 12)}}
    lm = {"title": "B", "task": "language-modeling", "metric": "perplexity", "higher_is_better": False,
          "methods": {"base": row("base", 0, mean=30.0), "lora": row("lora", 1000, 3, 20.0),
                      "ntk-kv": row("ntk", 800, 2, 25.0, edge="lower edge")}}
    lines = S.variant_table({"tasks": {"b": lm, "a": small}}).splitlines()
    assert lines[0] == "| variant | a (accuracy) | b (perplexity, lower is better) |"
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [
        "base", "head", "lora-r1", "lora", "lora-r16", "ntk-rank8", "ntk-kv", "ntk", "full"]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert cells["lora"] == ["0.800 ± 0.020 (100)", "20.00 ± 0.02 (1k) |"]
    assert cells["lora-r16"][0] == "0.500 (200) *"  # one seed: no "seed 0" note in this table; the edge marked
    assert cells["ntk-rank8"][0] == "0.500 (50)"  # a grid of one rate is not an edge
    assert cells["ntk-kv"] == ["", "25.00 ± 0.02 (800, 2 seeds) * |"]


def test_summary_counts_the_training_behind_its_rows():
    """A row's runs are every rate of its grid at the first seed plus one per further seed (none for the
    untuned model), and suite.md sums train seconds times runs per task and in all."""
    assert S.training_runs({"method": "lora", "validation_grid": {"0.001": 0.8, "0.003": 0.7}, "seeds": [0, 1, 2]}) == 4
    assert S.training_runs({"method": "head", "validation_grid": {}, "seeds": [0]}) == 1
    assert S.training_runs({"method": "base", "validation_grid": {}, "seeds": []}) == 0

    def row(method, seconds, runs):
        return {"method": method, "trainable_params": 10, "mean": 0.5, "std": 0.0, "seeds": 1,
                "train_seconds": seconds, "runs": runs}

    tasks = {"b": {"title": "B", "task": "language-modeling", "metric": "perplexity", "higher_is_better": False,
                   "methods": {"base": row("base", 0.0, 0), "lora": row("lora", 1800.0, 5)}},
             "a": {"title": "A", "task": "classification", "metric": "accuracy", "higher_is_better": True,
                   "methods": {"lora": row("lora", 360.0, 5), "ntk": row("ntk", 720.0, 5)}}}
    assert "Training behind these rows: about 4 core-hours (a 1.5, b 2.5)" in S.summary_table({"tasks": tasks})


def test_lead_table_says_how_many_seeds_a_cell_averages():
    """A mean over fewer seeds than the task's fullest row is marked, so it is not read as a 3-seed mean."""
    def row(method, params, seeds, mean):
        return {"method": method, "trainable_params": params, "mean": mean, "std": 0.01 if seeds > 1 else 0.0,
                "seeds": seeds}

    task = {"title": "T", "task": "classification", "metric": "accuracy",
            "methods": {"head": row("head", 0, 1, 0.5), "lora": row("lora", 73728, 3, 0.8),
                        "prefix-m16": row("prefix", 73728, 2, 0.7), "ntk": row("ntk", 76032, 1, 0.6)}}
    line = S.lead_table({"tasks": {"t": task}}).splitlines()[2].split(" | ")
    assert line[1:5] == ["0.500", "0.800 ± 0.010 (74k)", "0.700 ± 0.010 (74k, 2 seeds)", "0.600 (76k, seed 0)"]


def test_rows_whose_every_seed_chose_the_last_epoch_are_named():
    from ntk_attention.training.compare.report import rows_at_last_epoch

    def record(epochs, **best):
        return {"budget": {"epochs": epochs}, "methods": {label: {"best_epoch_per_seed": seeds} for label, seeds in best.items()}}

    rows = {"lora": [2.0, 2.0, 2.0], "ntk": [2.0, 1.0, 2.0], "base": [], "old": [None]}
    assert rows_at_last_epoch(record(2, **rows)) == ["lora"]
    assert rows_at_last_epoch(record(3, **rows)) == []
    assert rows_at_last_epoch(record(1, lora=[1.0])) == []  # one epoch is always the last
    assert rows_at_last_epoch({"methods": {"lora": {"best_epoch_per_seed": [2.0]}}}) == []  # no budget recorded


def test_grid_edge_says_which_rows_a_wider_grid_could_move():
    from ntk_attention.training.compare.report import grid_edge

    def row(chosen, *rates):
        return {"learning_rate": chosen, "validation_grid": {f"{rate:g}": 0.5 for rate in rates}}

    assert grid_edge(row(3e-3, 1e-3, 3e-3, 1e-2)) is None
    assert grid_edge(row(1e-2, 1e-3, 3e-3, 1e-2)) == "upper edge"
    assert grid_edge(row(1e-3, 1e-2, 1e-3, 3e-3)) == "lower edge"  # the grid's order does not matter
    assert grid_edge(row(5e-5, 5e-5)) == "one rate"
    assert grid_edge({"learning_rate": None, "validation_grid": {}}) is None  # untuned
