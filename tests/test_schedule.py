"""``mgd schedule``: schedule shapes, baselines on constructed cases, MGD, CLI end to end, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mgd.apps import schedule as app
from mgd.cli.main import main
from mgd.config import RunConfig, build_problem

TINY = ["schedule", "--dataset", "digits", "--steps", "20", "--width", "16", "--num-knots", "3"]


def tiny_config(**changes) -> RunConfig:
    return RunConfig(**{**dict(dataset="digits", steps=20, width=16, num_knots=3, weight_decay=5e-4), **changes}).resolved()


# --------------------------------------------------------------------------- shapes


def test_shapes_have_their_documented_form():
    T = 100
    step = app.shape_multipliers("step", T)
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[75] == pytest.approx(0.01)
    cosine = app.shape_multipliers("cosine", T)
    assert cosine[0] == 1.0 and cosine[-1] < 1e-3 and np.all(np.diff(cosine) < 0)
    warm = app.shape_multipliers("warmup_linear", T)
    assert warm.argmax() == 9 and warm[9] == 1.0 and warm[-1] == pytest.approx(1 / 90)
    cycle = app.shape_multipliers("one_cycle", T)
    assert cycle[0] == pytest.approx(1 / 25) and cycle.argmax() == 30 and cycle[-1] == pytest.approx(1 / 25 / 1e4)
    assert np.all(app.shape_multipliers("constant", T) == 1.0)
    with pytest.raises(app.UserError):
        app.shape_multipliers("sawtooth", T)


def test_knots_to_multipliers_matches_the_trainer():
    config = tiny_config()
    problem = build_problem(config)
    knots = np.array([-1.0, 0.5, 0.2])
    expected = app.knots_to_multipliers(knots, config.steps)
    meta = problem.trainer.check_meta({"lr_knots": torch.as_tensor(knots)})
    for t in (0, 7, 19):
        lr = problem.trainer.step_inputs(t, problem.trainer.local_meta(meta, t)).lr
        assert float(lr) == pytest.approx(config.lr * expected[t], rel=1e-5)


# --------------------------------------------------------------------------- baselines' scoring


class PeakScorer:
    """Val loss known in closed form: minimal for the cosine shape at peak 0.3 (absolute LR)."""

    def __init__(self, config):
        self.config, self.runs, self.seconds = config, 0, 0.0

    def score(self, meta):
        self.runs += 1
        lrs = self.config.lr * np.asarray(meta["lr"])
        peak = lrs.max()
        is_cosine = lrs[-1] < 0.01 * peak and lrs.argmax() == 0
        loss = (math.log(peak) - math.log(0.3)) ** 2 + (0.0 if is_cosine else 0.5)
        return {"val_loss": loss, "val_accuracy": 1.0 - loss}


def test_grid_search_finds_the_known_optimum_and_widens_off_the_edge():
    config = tiny_config(steps=50)
    scorer = PeakScorer(config)
    grid = app.grid_search(config, None, peaks=(0.01, 0.02, 0.04), scorer=scorer)
    assert grid.info["shape"] == "cosine"
    assert grid.info["peak"] == pytest.approx(0.32)  # the ×2 grid point nearest 0.3
    assert grid.info["widened"] >= 3 and not grid.info["best_on_edge"]
    assert grid.info["peaks"][-1] > grid.info["peak"]  # interior now
    assert grid.cost.training_runs == scorer.runs == len(grid.info["table"])
    assert np.allclose(config.lr * grid.meta["lr"], 0.32 * app.shape_multipliers("cosine", 50))


def test_grid_search_reports_a_best_left_on_the_edge():
    config = tiny_config(steps=50)
    grid = app.grid_search(config, None, peaks=(0.01, 0.02, 0.04), max_widen=1, scorer=PeakScorer(config))
    assert grid.info["best_on_edge"]


def test_random_search_spends_its_budget_and_keeps_the_best_draw():
    config = tiny_config(steps=50)
    scorer = PeakScorer(config)
    best = app.random_search(config, None, runs=90, seeds=(0, 1, 2), scorer=scorer)
    assert best.info["draws"] == 30 and scorer.runs == 30  # the fake scorer counts one per draw
    # the best draw is the best of all draws under the known loss
    rng_peak = best.info["best"]["peak"]
    assert abs(math.log(rng_peak / 0.3)) < 1.0
    with pytest.raises(app.UserError):
        app.random_search(config, None, runs=2, seeds=(0, 1, 2), scorer=scorer)


def test_hd_with_beta_zero_is_plain_sgd_and_follows_the_update_rule():
    config = tiny_config()
    problem = build_problem(config)
    state, trace, ok = app.hd_run(problem.trainer, alpha0=0.1, beta=0.0)
    assert ok and np.all(trace == 0.1)
    plain = problem.trainer.run({"lr": torch.full((config.steps,), 0.1 / config.lr, dtype=torch.float64)})
    assert torch.allclose(state.params, plain.params, atol=1e-6)
    # One step by hand: α1 = α0 + β ∇f(θ1)·d0 with d0 the first update direction.
    short = build_problem(tiny_config(steps=2))
    _, trace2, _ = app.hd_run(short.trainer, alpha0=0.1, beta=0.5)
    tr = short.trainer
    meta = tr.check_meta({})
    s1 = tr.step(tr.init_state(), {**meta, "lr": torch.full((2,), 0.1 / config.lr, dtype=torch.float64)})
    d0 = (tr.init_state().params - s1.params) / 0.1
    params = s1.params.detach().requires_grad_(True)
    inputs = tr.step_inputs(1, tr.local_meta(meta, 1))
    logits, _ = tr.stateless.train_call(params, s1.buffers, (inputs.x,), {})
    loss = torch.nn.functional.cross_entropy(logits, inputs.batch[1])
    (g,) = torch.autograd.grad(loss, params)
    g = g + config.weight_decay * s1.params
    assert trace2[1] == pytest.approx(0.1 + 0.5 * float(g @ d0), rel=1e-4)


def test_mgd_raises_a_poor_learning_rate():
    config = tiny_config(steps=40)
    from mgd.data import load_dataset

    cand = app.mgd_schedule(config, load_dataset("digits"), start_lr=0.01, meta_steps=4, meta_lr=0.2,
                            crafting_seeds=(0, 1), selection_seeds=(0,), rescore_top=2, metagradient_runs=4.0)
    values = cand.info["val_objective_by_step"]
    assert len(values) == 5 and cand.kind == "mgd"
    # From a too-small constant LR the metagradient says "larger": knots move up.
    assert np.all(np.asarray(cand.info["iterates"][-1]) > math.log(0.01 / config.lr) + 0.3)
    assert cand.info["chosen_step"] in [r["step"] for r in cand.info["rescoring"]]
    # cost: 4 metagradients at 4 runs each, the final iterate's run, 2 iterates x 1 seed rescored
    assert cand.cost.training_runs == pytest.approx(4 * 4.0 + 1 + 2)


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--meta-steps", "2", "--eval-seeds", "100,101", "--peaks", "0.05,0.1,0.2,0.4",
                   "--shapes", "constant,cosine", "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    names = set(report["methods"])
    assert {"mgd-poor", "mgd-reasonable", "grid", "random", "hd", "start-poor", "start-reasonable"} <= names
    assert report["methods"]["mgd-poor"]["kind"] == "mgd"
    for m in report["methods"].values():
        assert len(m["per_seed"]) == 2 and "test_accuracy" in m["per_seed"][0]
    assert (out / "report.md").read_text().count("| mgd-poor |") == 2  # main table and bar table
    assert (out / "schedules.png").stat().st_size > 0
    # Test numbers exist only in the evaluation: no candidate's saved info mentions test.
    for path in (out / "candidates").glob("*.json"):
        assert "test" not in path.read_text()
    # Resume keeps finished methods (their files are not rewritten).
    before = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.npz")}
    assert main(args[:-3] + ["--resume", str(out), "--quiet"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.npz")}
    assert all(after[n] == t for n, t in before.items() if n != "mgd-poor@grid-budget.npz")


def test_cli_subset_of_methods(tmp_path):
    out = tmp_path / "grid"
    assert main(TINY + ["--methods", "grid,hd", "--eval-seeds", "100,101", "--peaks", "0.05,0.1,0.2",
                        "--shapes", "constant", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"grid", "hd"}


@pytest.mark.parametrize("extra", [
    ["--methods", ""],
    ["--methods", "grid,bayesopt"],
    ["--shapes", "sawtooth"],
    ["--meta-steps", "0"],
    ["--eval-seeds", "0,1"],  # overlaps the crafting seeds
    ["--selection-seeds", "9"],
    ["--optimizer", "adam", "--methods", "hd"],
    ["--peaks", "0.1,-1"],
])
def test_bad_input_is_a_one_line_error(tmp_path, extra, capsys):
    assert main(TINY + extra + ["--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()  # rejected before any run directory is made
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err


def test_truncated_baseline_only_moves_the_knots_it_can_see():
    """With a horizon of the last 4 of 20 steps, only the last knot segment gets a gradient."""
    from mgd.apps.schedule import mgd_schedule
    from mgd.data import load_dataset

    config = tiny_config(num_knots=5)
    candidate = mgd_schedule(config, load_dataset("digits"), start_lr=0.01, name="truncated-poor", meta_steps=3,
                             crafting_seeds=(0, 1), selection_seeds=(0,), rescore_top=1, horizon=4,
                             kind="baseline", metagradient_runs=1.0)
    knots = candidate.meta["lr_knots"]
    start = np.log(0.01 / config.lr)
    # knots sit at steps 0, 4.75, 9.5, 14.25, 19: steps 16-19 touch only the last two
    assert np.allclose(knots[:3], start) and not np.allclose(knots[3:], start)
    assert candidate.kind == "baseline" and candidate.info["horizon"] == 4
