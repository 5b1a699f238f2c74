"""Each experiment's --quick run through the ``ntk-attn`` command, and its argument errors."""

import json

import pytest

from ntk_attention.cli import main


def run_cli(*argv) -> None:
    assert main(list(argv)) == 0


def test_approx_error_quick(tmp_path):
    run_cli("experiment", "approx-error", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "approx_error.json").read_text())
    for name in ("approx_error.md", "approx_error_vs_m.png", "approx_error_vs_r.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = {(s["inputs"], s["method"], s["feature_map"], s["m"]): s for s in result["summary"]}
    assert {key[1] for key in summary} == {"closed_form", "trained"}
    # the Taylor closed form is close on bounded inputs, the ELU+1 closed form is not
    assert summary[("uniform", "closed_form", "taylor:2", 1)]["rel_error"] < 0.05
    assert summary[("uniform", "closed_form", "elu", 1)]["rel_error"] > 1
    # a longer prefix takes a larger share of the attention mass
    shares = [summary[("uniform", "closed_form", "elu", m)]["prefix_share"] for m in (1, 16, 256)]
    assert shares == sorted(shares) and shares[-1] > 0.8
    # the trained (Z, k) beats the ELU+1 closed form it is not tied to
    assert summary[("uniform", "trained", "elu", 16)]["rel_error"] < summary[("uniform", "closed_form", "elu", 16)]["rel_error"]
    # --replot rebuilds the same summary from the saved rows without measuring
    (tmp_path / "approx_error.md").unlink()
    run_cli("experiment", "approx-error", "--replot", "--out", str(tmp_path))
    assert "slope" in (tmp_path / "approx_error.md").read_text()
    assert json.loads((tmp_path / "approx_error.json").read_text())["summary"] == result["summary"]


def test_replot_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the measurement first"):
        main(["experiment", "approx-error", "--replot", "--out", str(tmp_path)])
    (tmp_path / "approx_error.json").write_text('{"config": {}, "rows": [{"m": 4}]}')
    with pytest.raises(ValueError, match="row 0 lacks"):
        main(["experiment", "approx-error", "--replot", "--out", str(tmp_path)])


def test_convergence_quick(tmp_path):
    run_cli("experiment", "convergence", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "convergence_gd.json").read_text())
    assert (tmp_path / "convergence_gd.png").stat().st_size > 0
    prefix = {r["m"]: r for r in result["runs"] if r["model"] == "prefix"}
    assert prefix[256]["final_loss"] < prefix[1]["final_loss"]  # longer prefix, lower loss
    for run in result["runs"]:
        assert run["final_loss"] < run["curve"][0]
        assert len(run["curve"]) == result["config"]["steps"] + 1
    assert {r["model"] for r in result["runs"]} >= {"ntk elu", "ntk taylor:2"}


def test_rank_quick(tmp_path):
    run_cli("experiment", "rank", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "rank.json").read_text())
    assert (tmp_path / "rank.png").stat().st_size > 0
    d = result["config"]["head_dim"]
    for row in result["rows"]:
        s = row["rank"]
        assert row["params"] == (row["r"] * d + row["r"] if s is None else row["r"] * s + s * d + row["r"])
    svd = {(r["feature_map"], r["rank"]): r["rel_error"] for r in result["rows"] if r["method"] == "closed_form_svd"}
    full = {r["feature_map"]: r["rel_error"] for r in result["rows"] if r["method"] == "closed_form"}
    assert svd[("elu", 16)] == pytest.approx(full["elu"], rel=1e-6)  # rank 16 = d is full rank


@pytest.mark.parametrize(
    "argv, message",
    [
        (["approx-error", "--m", "0", "4"], "prefix lengths m must be integers >= 1"),
        (["approx-error", "--feature-maps", "softmax"], "unknown feature_map 'softmax'"),
        (["convergence", "--m", "-2"], "prefix lengths m must be integers >= 1"),
        (["rank", "--ranks", "1", "17"], "ranks \\[17\\] do not fit feature map elu"),
    ],
)
def test_bad_arguments(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        main(["experiment", *argv, "--quick", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_bad_option_values_are_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "rank", "--m", "0", "--out", str(tmp_path)])
    assert "expected an integer >= 1" in capsys.readouterr().err
