"""Metasmoothness scores, recipes, and the `mgd smoothness` command."""

from __future__ import annotations

import json

import pytest
import torch

import mgd
from mgd.cli.main import main
from mgd.recipes import parse_recipe
from mgd.smoothness import curvature, metasmoothness, probe, sign_agreement, trainer_probe_fn

from conftest import tiny_problem


def test_curvature_of_a_quadratic_is_its_second_derivative():
    a, v = 3.0, torch.tensor([0.5, -2.0], dtype=torch.float64)

    def train(z):
        x = z["x"]
        return x.clone(), float(a * (x**2).sum())

    result = probe(train, {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"x": v}, h=0.1)
    assert result.curvature == pytest.approx(2 * a * float((v**2).sum()), rel=1e-9)
    assert result.sign_agreement == 1.0  # parameters move linearly
    assert curvature(1.0, 1.0, 1.0, 0.5) == 0.0


def test_sign_agreement_weights_by_movement():
    zero = torch.zeros(2, dtype=torch.float64)
    # coordinate 0 reverses (weight 1), coordinate 1 keeps going (weight 3): (−1 + 3) / 4
    theta_h = torch.tensor([1.0, 1.0], dtype=torch.float64)
    theta_2h = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    assert sign_agreement(zero, theta_h, theta_2h, 0.1) == pytest.approx(0.5)
    assert sign_agreement(zero, zero, zero, 0.1) == 1.0  # nothing moves


def test_metasmoothness_of_a_real_run_is_deterministic(digits):
    trainer, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=10, metaparams=("data_weights",))
    train = trainer_probe_fn(trainer, objective)
    a = metasmoothness(train, trainer.default_meta(), "data_weights", directions=2, h=0.05)
    b = metasmoothness(train, trainer.default_meta(), "data_weights", directions=2, h=0.05)
    assert a.to_dict() == b.to_dict()
    assert len(a.probes) == 2 and -1.0 <= a.sign_agreement <= 1.0 and a.curvature > 0
    with pytest.raises(mgd.UserError, match="no metaparameter"):
        metasmoothness(train, trainer.default_meta(), "lr")


def test_recipes_parse_and_refuse_unknown_knobs():
    recipe = parse_recipe("smooth:norm=bn_before,logit_scale=0.1,width=64,nesterov=true")
    assert recipe.knobs == {"norm": "bn_before", "logit_scale": 0.1, "width": 64, "nesterov": True}
    assert recipe.apply(mgd.config.RunConfig()).width == 64
    assert parse_recipe("baseline").knobs == {}
    with pytest.raises(mgd.UserError, match="unknown knob 'dropout'"):
        parse_recipe("x:dropout=0.5")
    with pytest.raises(mgd.UserError, match="cannot read"):
        parse_recipe("x:width=wide")


def test_smoothness_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["smoothness", "--steps", "12", "--width", "8", "--batch-size", "50", "--directions", "2",
            "--recipe", "base", "--recipe", "l10:logit_scale=0.1", "--recipe", "bn:norm=bn_before",
            "--mgd-steps", "2", "--crafting-seeds", "0,1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["base", "l10", "bn"]
    assert all(len(r["mgd_val_objective"]) == 3 for r in report["rows"])
    assert set(report["correlations"]) == {"sign_agreement", "neg_log_curvature"}
    assert (out / "smoothness.png").stat().st_size > 0 and "| l10 |" in (out / "report.md").read_text()
    # resuming a finished study recomputes nothing and gives the same report
    assert main([*argv[:-2], "--resume", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


@pytest.mark.parametrize(
    "recipe,expected",
    [("x:norm=bn_middle", "unknown norm"), ("x:colour=blue", "unknown knob"), ("x:pooling=median", "unknown pooling")],
)
def test_bad_recipes_exit_2_before_any_work(tmp_path, capsys, recipe, expected):
    out = tmp_path / "s"
    model = ["--model", "cnn"] if "pooling" in recipe else []
    assert main(["smoothness", *model, "--recipe", recipe, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
