"""Tests of ``mgd poison`` (mgd.apps.poison and its CLI): tiny configs, CPU, float64 where exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mgd.apps.poison import (
    METHODS,
    PoisonBox,
    PoisonProjection,
    _poison_trainer,
    error_max,
    gradient_cancelling_loss,
    gradpc_target,
    label_flips,
    plan_poisons,
    poisoning_summary,
    random_noise,
    victim_config,
)
from mgd.cli.main import main
from mgd.config import build_problem
from mgd.data import load_dataset
from mgd.replay import metagradient

TINY = ["--steps", "8", "--width", "8", "--batch-size", "50", "--threads", "1"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny_config(**kw):
    return victim_config("digits", steps=8, width=8, batch_size=50, warmup_steps=2, **kw)


# ----------------------------------------------------------------------------- plan and box


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("labels", ["fixed", "free"])
def test_plan_counts_labels_and_positions(digits, mode, labels):
    plan = plan_poisons(digits, budget=0.03, mode=mode, labels=labels)
    n = len(digits.y_train)
    assert len(plan.slots) == 30
    assert len(plan.y) == (n if mode == "replace" else n + 30)
    np.testing.assert_array_equal(plan.x[plan.slots], digits.x_train[plan.sources])
    true = digits.y_train[plan.sources]
    if labels == "fixed":
        np.testing.assert_array_equal(plan.y[plan.slots], true)
    else:  # flipped copies: every label wrong
        assert np.all(plan.y[plan.slots] != true)
    clean = plan.clean_mask
    if mode == "replace":
        np.testing.assert_array_equal(plan.x[clean], digits.x_train[clean])
    else:
        np.testing.assert_array_equal(plan.x[:n], digits.x_train)


def test_box_is_unit_for_digits_and_train_range_for_mnist1d(digits):
    box = PoisonBox.for_dataset(digits)
    assert box.lo.min() == 0 and box.hi.max() == 1
    mnist1d = load_dataset("mnist1d")
    box = PoisonBox.for_dataset(mnist1d)
    np.testing.assert_array_equal(box.lo, mnist1d.x_train.min(0))
    np.testing.assert_array_equal(box.hi, mnist1d.x_train.max(0))
    u = box.to_unit(mnist1d.x_train[:5])
    assert u.min() >= 0 and u.max() <= 1
    np.testing.assert_allclose(box.from_unit(u), mnist1d.x_train[:5])


def test_projection_holds_clean_rows_and_clips_poisons():
    clean = torch.rand(6, 3)
    mask = torch.tensor([False, True, False, False, True, False])
    z = torch.randn(6, 3) * 5
    out = PoisonProjection(mask, clean)(z)
    assert torch.equal(out[~mask], clean[~mask])
    assert torch.equal(out[mask], z[mask].clamp(0, 1))


# ----------------------------------------------------------------------------- baselines' cores


def test_random_noise_and_flips(digits):
    box = PoisonBox.for_dataset(digits)
    plan = plan_poisons(digits, budget=0.02, mode="replace", labels="fixed")
    noise = random_noise(digits, plan, box)
    assert box.contains(noise.x_train[plan.slots])
    np.testing.assert_array_equal(noise.y_train, plan.y)  # label-fixed keeps labels
    flips = label_flips(digits, plan)
    assert np.all(flips.y_train[plan.slots] != digits.y_train[plan.sources])
    np.testing.assert_array_equal(flips.x_train, plan.x)  # only labels change


def test_gradient_cancelling_loss_is_zero_when_poisons_cancel_exactly(digits):
    cfg = tiny_config(dtype="float64")
    problem = build_problem(cfg, dataset=digits)
    params = problem.trainer.run().params
    x = torch.as_tensor(digits.x_train[:5])
    y = torch.as_tensor(digits.y_train[:5])
    p = params.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(problem.trainer.predict(p, problem.trainer.flat_buffers(), x), y,
                                             reduction="sum")
    (g,) = torch.autograd.grad(loss, p)
    # The clean gradient is exactly minus the poisons' gradient: perfect cancellation.
    assert gradient_cancelling_loss(problem, params, -g, x, y).item() < 1e-20
    # Without a clean gradient the objective is the squared norm of the poisons' gradient.
    value = gradient_cancelling_loss(problem, params, torch.zeros_like(g), x, y).item()
    assert value == pytest.approx(float(g.pow(2).sum()), rel=1e-12)


def test_gradpc_target_stays_in_the_ball_and_raises_the_loss(digits):
    problem = build_problem(tiny_config(dtype="float64"), dataset=digits)
    params = problem.trainer.run().params
    x, y = torch.as_tensor(digits.x_train), torch.as_tensor(digits.y_train)

    def loss(p):
        return float(torch.nn.functional.cross_entropy(problem.trainer.predict(p, problem.trainer.flat_buffers(), x), y))

    target = gradpc_target(problem, params, x, y, radius=0.5)
    assert (target - params).norm().item() <= 0.5 + 1e-9
    assert loss(target) > loss(params)


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_error_max_raises_the_surrogate_loss_and_stays_in_box(name):
    data = load_dataset(name)
    cfg = victim_config(name, steps=8, width=8, batch_size=50, warmup_steps=2)
    box = PoisonBox.for_dataset(data)  # mnist1d: float64 bounds that float32 cannot hold exactly
    plan = plan_poisons(data, budget=0.005, mode="replace", labels="fixed")
    cand = error_max(cfg, data, plan, box, step_counts=(3,), tune_seeds=(0,))
    assert box.contains(cand.x_train[plan.slots], tol=0.0)
    problem = build_problem(cfg, dataset=data)  # the surrogate: crafting seed 0
    state = problem.trainer.run()
    y = torch.as_tensor(plan.y[plan.slots])

    def loss(x):
        x = torch.as_tensor(x, dtype=torch.float32)
        return float(torch.nn.functional.cross_entropy(problem.trainer.predict(state.params, state.buffers, x), y))

    assert loss(cand.x_train[plan.slots]) > loss(plan.x[plan.slots]) + 0.05


def test_poison_metagradient_matches_finite_differences(digits):
    """The poison_inputs kind: REPLAY metagradient vs a central difference, float64."""
    small = digits.__class__(**{**digits.__dict__, "x_train": digits.x_train[:200], "y_train": digits.y_train[:200]})
    cfg = tiny_config(dtype="float64")
    plan = plan_poisons(small, budget=0.02, mode="add", labels="fixed")
    box = PoisonBox.for_dataset(small)
    trainer, objective = _poison_trainer(cfg, small, plan, box, seed=0)
    u = trainer.check_meta({})["poison_inputs"].clone()
    grad = metagradient(trainer, objective, {"poison_inputs": u}, wrt=["poison_inputs"]).grads["poison_inputs"]
    direction = torch.zeros_like(u)
    direction[torch.as_tensor(plan.slots)] = torch.randn((len(plan.slots),) + u.shape[1:],
                                                         generator=torch.Generator().manual_seed(0), dtype=u.dtype)

    def f(z):
        final = trainer.run({"poison_inputs": z})
        return float(objective(trainer.named_tensors(final.params, final.buffers)))

    h = 1e-5
    fd = (f(u + h * direction) - f(u - h * direction)) / (2 * h)
    exact = float((grad * direction).sum())
    assert exact == pytest.approx(fd, rel=1e-5)
    assert abs(exact) > 1e-6


def test_summary_pairs_drops_and_picks_the_strongest_baseline_by_val():
    def seeds(test, val):
        return [{"test_accuracy": t, "val_accuracy": v} for t, v in zip(test, val)]

    report = {"methods": {
        "no_poison": {"kind": "reference", "per_seed": seeds([0.9, 0.8], [0.9, 0.9])},
        "a": {"kind": "baseline", "per_seed": seeds([0.8, 0.7], [0.9, 0.9])},  # big test drop, no val drop
        "b": {"kind": "baseline", "per_seed": seeds([0.9, 0.8], [0.8, 0.8])},  # val drop only
        "mgd": {"kind": "mgd", "per_seed": seeds([0.7, 0.6], [0.7, 0.7])},
    }}
    s = poisoning_summary(report, gradcancel_name="a")
    assert s["drops"]["a"]["test_drop"]["mean"] == pytest.approx(0.1)
    assert s["drops"]["mgd"]["test_drop"]["mean"] == pytest.approx(0.2)
    assert s["drops"]["mgd"]["val_minus_test"] == pytest.approx(0.0)
    assert s["strongest_baseline"] == "b"  # chosen on validation, not on test
    assert s["mgd_vs_strongest"]["test_drop_diff"]["mean"] == pytest.approx(0.2)
    assert s["mgd_over_gradcancel"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- the command


def test_command_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["poison", "--dataset", "digits", *TINY, "--budget", "0.01", "--meta-steps", "2",
            "--eval-seeds", "100,101", "--crafting-seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"no_poison", *METHODS}
    assert report["methods"]["mgd"]["kind"] == "mgd"
    assert set(report["poisoning"]["drops"]) == set(METHODS)
    assert "transfer" in report and set(report["transfer"]["poisoning"]["drops"]) == set(METHODS)
    assert (out / "report.md").read_text().count("| mgd |") >= 2
    assert report["setup"]["poisons"] == 10
    # Test numbers appear only in the evaluation: no method's own record mentions test.
    for name in METHODS:
        info = (out / "candidates" / f"{name}.json").read_text()
        assert "test" not in info
    # Poisons stay in the box; clean rows are untouched.
    data = load_dataset("digits")
    slots = np.asarray(report["setup"]["slots"])
    x = np.load(out / "candidates" / "mgd.npz")["x_train"]
    assert x[slots].min() >= 0 and x[slots].max() <= 1
    assert not np.array_equal(x[slots], data.x_train[slots])  # MGD moved them
    clean = np.ones(len(x), bool)
    clean[slots] = False
    np.testing.assert_array_equal(x[clean], data.x_train[clean])
    # Resume reuses the saved candidates and reproduces the report.
    before = (out / "candidates" / "gradcancel.npz").stat().st_mtime_ns
    assert main(["poison", "--dataset", "digits", *TINY, "--budget", "0.01", "--meta-steps", "2",
                 "--eval-seeds", "100,101", "--crafting-seeds", "0,1", "--resume", str(out), "--quiet"]) == 0
    assert (out / "candidates" / "gradcancel.npz").stat().st_mtime_ns == before
    again = json.loads((out / "report.json").read_text())
    assert again["poisoning"]["drops"]["mgd"]["test_drop"] == report["poisoning"]["drops"]["mgd"]["test_drop"]


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "budget"),
    (["--budget", "1.5"], "budget"),
    (["--budget", "0.0001"], "less than one poison"),
    (["--methods", ""], "empty"),
    (["--methods", "mgd,bogus"], "bogus"),
    (["--eval-seeds", "0,1"], "overlap"),
    (["--meta-steps", "-1"], "meta-steps"),
    (["--seeds-per-step", "6"], "--seeds-per-step"),
    (["--craft-also", "wide:bogus=1"], "unknown knob"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, extra, message):
    args = ["poison", "--dataset", "digits", *TINY, "--out", str(tmp_path / "r"), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- stronger MGD


def test_clipped_margin_on_known_logits():
    from mgd.losses import clipped_margin

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.5, 0.5], [0.0, 0.2, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])
    # best other minus own: 1 - 3 = -2; 2.5 - 0 = 2.5, clipped to 1; 0.2 - 0.1 = 0.1
    assert torch.allclose(clipped_margin(1.0)(logits, (None, labels)), torch.tensor([-2.0, 1.0, 0.1], dtype=torch.float64))


def test_mgd_poison_averages_over_recipes_and_maximises_the_margin(digits):
    """Crafting against two recipes: the first meta-step's value is the mean of the two
    recipes' validation margins on the unpoisoned copies, each from a plain training run."""
    from dataclasses import replace as dc_replace

    from mgd.apps.poison import mgd_poison
    from mgd.losses import clipped_margin

    small = dc_replace(digits, x_train=digits.x_train[:200], y_train=digits.y_train[:200])
    cfg = tiny_config(dtype="float64")
    other = dc_replace(cfg, activation="relu", width=12, lr=0.1)
    plan = plan_poisons(small, budget=0.02, mode="replace", labels="fixed")
    box = PoisonBox.for_dataset(small)
    candidate = mgd_poison(cfg, small, plan, box, meta_steps=1, crafting_seeds=[0, 1], seeds_per_step=2,
                           objective="margin", recipes=[other])
    margins = []
    for recipe, seed in ((cfg, 0), (other, 1)):
        problem = build_problem(dc_replace(recipe, seed=seed),
                                dataset=dc_replace(small, x_train=plan.x, y_train=plan.y))
        final = problem.trainer.run()
        with torch.no_grad():
            logits = problem.trainer.predict(final.params, final.buffers, problem.x_val)
        margins.append(float(clipped_margin()(logits, (None, problem.y_val)).mean()))
    history = candidate.info["history"]
    assert history[0]["val_objective"] == pytest.approx(np.mean(margins), rel=1e-9)
    assert abs(margins[0] - margins[1]) > 1e-3  # two different recipes, not one twice
    assert candidate.info["objective"] == "margin" and len(candidate.info["crafting_recipes"]) == 2
    assert history[1]["val_objective"] > history[0]["val_objective"]  # one ascent step raised it
