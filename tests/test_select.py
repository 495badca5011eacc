"""mgd select: the command end to end, each baseline's scoring on known cases, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mgd.apps import select as S
from mgd.cli.main import main
from mgd.config import RunConfig
from mgd.corruption import near_duplicates, off_distribution
from mgd.data import load_dataset
from mgd.errors import UserError

TINY = ["--steps", "20", "--width", "8", "--eval-seeds", "100,101", "--crafting-seeds", "0,1", "--quiet"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------- end to end


def test_command_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["select", "--dataset", "digits", "--corruption", "mixed", "--budget", "0.5", "--meta-steps", "2",
            "--out", str(out), *TINY]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    expected = [n for m in S.METHODS for n in S.candidate_names(m)]
    assert sorted(methods) == sorted(expected)
    k = report["selection"]["k"]
    assert k == 500
    for name, m in methods.items():
        # every number in the table comes from retraining on the evaluation seeds
        assert [r["seed"] for r in m["per_seed"]] == [100, 101]
        assert np.isclose(m["test_accuracy"]["mean"], np.mean([r["test_accuracy"] for r in m["per_seed"]]))
        if m["info"].get("selection") == "subset" and name != "oracle":
            assert m["train_size"] == k, name
    assert methods["full"]["train_size"] == 1000
    assert methods["mgd-reweighting"]["train_size"] == 1000  # a reweighting, not a subset
    assert methods["mgd-selection"]["kind"] == "mgd"
    assert methods["oracle"]["kind"] == methods["val-only"]["kind"] == "reference"
    assert methods["oracle"]["info"]["precision"] == 1.0
    assert report["best_baseline_by_val"] not in ("oracle", "val-only", "mgd-selection")
    assert len(report["selection"]["mgd_history"]) == 3
    text = (out / "report.md").read_text()
    assert "mgd-selection" in text and "precision" in text
    assert (out / "precision.png").is_file() and (out / "mgd_progress.png").is_file()
    # resume: every candidate is already saved, so nothing is recomputed and the table is the same
    assert main([*argv[:-len(TINY) - 2], *TINY, "--resume", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    for name in methods:
        assert again["methods"][name]["test_accuracy"] == methods[name]["test_accuracy"]
        assert again["methods"][name]["cost"] == methods[name]["cost"]


def test_methods_subset_and_own_npz_pool(tmp_path, digits):
    path = tmp_path / "pool.npz"
    np.savez(path, x_train=digits.x_train[:300], y_train=digits.y_train[:300], x_val=digits.x_val,
             y_val=digits.y_val, x_test=digits.x_test, y_test=digits.y_test)
    out = tmp_path / "run"
    assert main(["select", "--dataset", str(path), "--budget", "0.3", "--methods", "random,small-loss",
                 "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["methods"]) == ["random", "small-loss"]
    assert report["methods"]["random"]["train_size"] == 90


# ----------------------------------------------------------------------------- corruption


def test_corruptions_are_disjoint_and_as_specified(digits):
    pool = S.corrupt_pool(digits, label_noise=0.15, off_distribution=0.1, duplicates=0.1, seed=3)
    counts = pool.composition(np.arange(1000))["counts"]
    assert counts == {"clean": 650, "label-noise": 150, "off-distribution": 100, "duplicate": 100}
    again = S.corrupt_pool(digits, label_noise=0.15, off_distribution=0.1, duplicates=0.1, seed=3)
    assert np.array_equal(pool.dataset.x_train, again.dataset.x_train)
    # clean examples are untouched; validation and test are never corrupted
    clean = pool.clean
    assert np.array_equal(pool.dataset.x_train[clean], digits.x_train[clean])
    assert np.array_equal(pool.dataset.y_train[clean], digits.y_train[clean])
    assert pool.dataset.x_val is digits.x_val
    # label noise changes every chosen label; duplicates are near-copies of a few clean sources
    assert (pool.dataset.y_train[pool.kind == 1] != digits.y_train[pool.kind == 1]).all()
    dup = pool.dataset.x_train[pool.kind == 3].reshape(100, -1)
    distances = np.linalg.norm(dup[:, None] - digits.x_train[clean].reshape(650, -1)[None], axis=2)
    assert distances.min(axis=1).max() < 0.1
    assert len(np.unique(distances.argmin(axis=1))) == 5  # 100 copies of 5 sources


def test_off_distribution_inverts_bounded_and_noises_unbounded():
    x = np.random.default_rng(0).random((40, 1, 4, 4))
    y = np.zeros(40, dtype=np.int64)
    x2, y2, mask = off_distribution(x, y, 0.5, 10, seed=0)
    assert mask.sum() == 20 and not np.array_equal(x2[mask], x[mask])
    inverted = [i for i in np.flatnonzero(mask) if np.allclose(x2[i], 1 - x[i])]
    assert len(inverted) == 10
    assert np.array_equal(x2[~mask], x[~mask])
    with pytest.raises(UserError):
        near_duplicates(x, y, 0.6, seed=0, exclude=mask)


# ----------------------------------------------------------------------------- scores


def test_filter_scores_on_known_logits():
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.2, 0.0]])
    labels = np.array([0, 0, 1])  # right and confident, confidently wrong, barely right
    assert list(np.argsort(S.loss_scores(logits, labels))) == [0, 2, 1]
    assert np.allclose(S.margin_scores(logits, labels), [5.0, -5.0, 0.2])
    assert list(np.argsort(S.el2n_scores(logits, labels))) == [0, 2, 1]
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert np.allclose(S.agreement_scores(probs, np.array([1, 1])), [0.1, 0.8])
    assert list(S.top_k(np.array([3.0, 1.0, 2.0]), 2)) == [0, 2]
    assert list(S.top_k(np.array([3.0, 1.0, 2.0]), 1, largest=False)) == [1]
    # ties go to the better tie-break value
    assert list(S.top_k(np.array([1.0, 1.0, 1.0]), 1, tiebreak=np.array([0.0, 5.0, 1.0]))) == [1]
    with pytest.raises(UserError):
        S.top_k(np.ones(3), 0)


def test_less_scores_prefer_gradients_aligned_with_a_validation_class():
    val = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    val_labels = np.array([0, 0, 1])
    train = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0], [-1.0, -1.0, 0.0]])
    scores = S.less_scores([train, train], [val, val], val_labels, [0.5, 0.5])
    # cosine, not magnitude: the first two are each perfectly aligned with one class; the max
    # over classes (subtasks) rewards alignment with any one of them
    assert np.allclose(scores, [1.0, 1.0, 0.0, -np.sqrt(0.5)])


def test_last_layer_influence_matches_autograd_reference():
    torch.manual_seed(0)
    c, d, n, m = 3, 4, 30, 10
    weight, bias = torch.randn(c, d, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    fp, fv = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    yp, yv = torch.randint(0, c, (n,)), torch.randint(0, c, (m,))
    damping, scale = 0.1, 0.5
    scores = S.last_layer_influence_scores(weight, bias, fp, yp, fv, yv, damping=damping, logit_scale=scale)

    def loss(u, f, y, reduction="mean"):
        w = u.reshape(c, d + 1)
        return torch.nn.functional.cross_entropy(scale * (f @ w[:, :d].T + w[:, d]), y, reduction=reduction)

    u = torch.cat([weight, bias[:, None]], dim=1).reshape(-1)
    hessian = torch.func.hessian(lambda u: loss(u, fp, yp))(u)
    g_val = torch.func.grad(lambda u: loss(u, fv, yv, "sum"))(u)
    s = torch.linalg.solve(hessian + damping * torch.eye(len(u), dtype=torch.float64), g_val)
    per_example = torch.func.vmap(torch.func.grad(lambda u, f, y: loss(u, f[None], y[None])), in_dims=(None, 0, 0))(u, fp, yp)
    assert np.allclose(scores, (per_example @ s).numpy(), rtol=1e-8, atol=1e-10)


def test_tracin_jvp_and_per_example_grads_match_a_plain_autograd_loop(digits):
    from mgd.apps.tasks import losses_jvp, per_example_grads, sum_of_losses_gradient

    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[:50], y_train=digits.y_train[:50]))
    ctx = S.SelectionContext(RunConfig(steps=5, width=8, batch_size=10, dtype="float64").resolved(), pool, 10, [0])
    run, objective = ctx.make(0)
    state = run.run()
    x, y = run.x_train, run.y_train

    def loss_of(params, xi, yi):  # the reference: one example at a time, plain autograd
        params = params.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(run.predict(params, state.buffers, xi), yi, reduction="sum")
        return torch.autograd.grad(loss, params)[0]

    reference = torch.stack([loss_of(state.params, x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    grads = per_example_grads(run, state.params, state.buffers, chunk=16)
    assert torch.allclose(grads, reference, rtol=1e-10, atol=1e-13)
    val_x = torch.as_tensor(digits.x_val, dtype=torch.float64)
    val_y = torch.as_tensor(digits.y_val)
    direction = sum_of_losses_gradient(run, state.params, state.buffers, objective.data, objective.loss)
    assert torch.allclose(direction, loss_of(state.params, val_x, val_y), rtol=1e-10, atol=1e-12)
    dots = losses_jvp(run, state.params, state.buffers, direction)
    assert np.allclose(dots, (reference @ direction).numpy(), rtol=1e-9, atol=1e-12)


def test_val_agreement_and_small_loss_drop_flipped_labels(digits):
    """On a pool whose second half has wrong labels, both filters keep mostly the clean half."""
    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[:400], y_train=digits.y_train[:400]),
                          label_noise=0.4, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=150, width=32).resolved(), pool, 200, [0, 1, 2], run_seconds=1.0)
    for candidate in [S.select_val_agreement(ctx), *S.select_by_early_training(ctx, ["small-loss"])]:
        assert len(candidate.y_train) == 200
        assert candidate.info["precision"] > 0.85, candidate.name


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra",
    [
        ["--budget", "0"],
        ["--budget", "1.5"],
        ["--methods", ""],
        ["--methods", "random,bogus"],
        ["--label-noise", "0.5", "--off-distribution", "0.3", "--duplicates", "0.3"],
        ["--duplicates", "1.2"],
        ["--mask-prob", "0"],
        ["--eval-seeds", "0,100"],
        ["--noise-seed", "3"],
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, extra):
    assert main(["select", "--dataset", "digits", "--out", str(tmp_path / "r"), *TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err


def test_pool_with_one_class_is_refused(digits):
    one = digits.y_train == 0
    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[one], y_train=digits.y_train[one]))
    with pytest.raises(UserError, match="2 classes"):
        S.run_selection(RunConfig(steps=5, width=8).resolved(), pool, methods=["random"],
                        crafting_seeds=[0], eval_seeds=[100])


# ----------------------------------------------------------------------------- fair baselines


def test_class_quotas_follow_the_pool_and_sum_to_k():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    assert S.class_quotas(labels, 10) == {0: 5, 1: 3, 2: 2}
    assert S.class_quotas(labels, 7) == {0: 4, 1: 2, 2: 1}  # 3.5, 2.1, 1.4: the largest remainder rounds up
    assert sum(S.class_quotas(labels, 99).values()) == 99
    assert S.class_quotas(labels, 100) == {0: 50, 1: 30, 2: 20}


def test_balanced_top_k_ranks_within_each_label():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])  # class 0 dominates a global ranking
    assert list(S.top_k(scores, 4)) == [0, 1, 2, 3]
    assert list(S.balanced_top_k(scores, labels, 4)) == [0, 1, 6, 7]
    assert list(S.balanced_top_k(scores, labels, 4, largest=False)) == [2, 3, 4, 5]
    with pytest.raises(UserError):
        S.balanced_top_k(scores, labels, 9)


def test_adam_features_match_a_hand_computed_adam_direction():
    g = torch.tensor([[0.5, -2.0], [1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([0.1, 0.2], dtype=torch.float64)
    v = torch.tensor([0.01, 0.04], dtype=torch.float64)
    out = S.adam_features(g, m, v, beta1=0.9, beta2=0.999, eps=1e-8)
    for row in range(2):
        for j in range(2):
            m1 = 0.9 * m[j].item() + 0.1 * g[row, j].item()
            v1 = 0.999 * v[j].item() + 0.001 * g[row, j].item() ** 2
            assert out[row, j].item() == pytest.approx(m1 / (v1 + 1e-8) ** 0.5, rel=1e-12)


def test_rademacher_projection_is_seeded_and_keeps_inner_products():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5000, generator=gen, dtype=torch.float64)
    a = S.rademacher_project(x, 4096, seed=1, chunk=1000)
    assert torch.equal(a, S.rademacher_project(x, 4096, seed=1, chunk=1000))
    assert torch.allclose(a, S.rademacher_project(x, 4096, seed=1, chunk=500))  # chunking changes only round-off
    assert not torch.equal(a, S.rademacher_project(x, 4096, seed=2, chunk=1000))
    exact, projected = x @ x.T, a @ a.T
    # Johnson-Lindenstrauss: relative error of the Gram matrix about 1/sqrt(4096) per entry
    assert (projected - exact).abs().max() / exact.diagonal().mean() < 0.1


def test_less_uses_adam_features_and_every_score_baseline_tunes_its_balance(digits):
    pool = S.corrupt_pool(digits, label_noise=0.3, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=20, width=8).resolved(), pool, 300, [0, 1, 2], run_seconds=0.1)
    candidates = [S.select_less(ctx), S.select_val_agreement(ctx),
                  *S.select_by_early_training(ctx, ["small-loss"], fractions=(0.3,))]
    for candidate in candidates:
        hyper = candidate.info["hyperparameters"]
        assert hyper["balance"] in S.BALANCE
        assert len(candidate.info["tuning_on_val"]) == 2  # one option, both balances, on validation
        assert len(candidate.y_train) == 300
    less = candidates[0].info["hyperparameters"]
    assert less["warmup_optimizer"].startswith("adam") and less["projection"] == "none"


def test_small_validation_keeps_n_per_class_and_nothing_else(digits):
    from mgd.data import small_validation

    small = small_validation(digits, 5, seed=3)
    assert np.bincount(small.y_val, minlength=10).tolist() == [5] * 10
    rows = {tuple(r.ravel()) for r in digits.x_val}
    assert all(tuple(r.ravel()) in rows for r in small.x_val)
    assert small.x_train is digits.x_train and small.x_test is digits.x_test
    again = small_validation(digits, 5, seed=3)
    assert np.array_equal(again.x_val, small.x_val)
    assert not np.array_equal(small_validation(digits, 5, seed=4).x_val, small.x_val)
    with pytest.raises(UserError, match="fewer than"):
        small_validation(digits, 1000)


def test_command_with_a_small_validation_split_and_averaged_mgd(tmp_path):
    out = tmp_path / "run"
    assert main(["select", "--dataset", "digits", "--methods", "val-agreement,mgd", "--meta-steps", "2",
                 "--val-per-class", "3", "--seeds-per-step", "2", "--subset-seeds", "2",
                 "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["val_per_class"] == 3
    assert report["selection"]["mgd"]["seeds_per_step"] == 2
    assert main(["select", "--dataset", "digits", "--seeds-per-step", "3", "--out", str(tmp_path / "x"), *TINY]) == 2


def test_budget_aware_mgd_keeps_the_weights_on_the_budget(digits):
    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[:200], y_train=digits.y_train[:200]),
                          label_noise=0.3, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=10, width=8, batch_size=20).resolved(), pool, 50, [0, 1], run_seconds=0.1)
    settings = S.MGDSettings(meta_steps=4, step_size=0.3, mask_prob=0.5, budget_aware=True)
    selection, reweighting, history = S.mgd_select(ctx, settings)
    w = reweighting.meta["data_weights"]
    assert w.sum() == pytest.approx(200.0, rel=1e-5) and w.max() <= 4.0 + 1e-5 and w.min() >= 0.0
    assert reweighting.info["chosen_iterate"] > 0 and np.ptp(w) > 0  # it moved, within the set
    assert len(selection.y_train) == 50


def test_validation_holdout_splits_per_class_and_the_metagradient_sees_only_its_part(digits):
    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[:200], y_train=digits.y_train[:200]),
                          label_noise=0.3, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=10, width=8, batch_size=20).resolved(), pool, 100, [0, 1], run_seconds=0.1)
    crafting, held = S._split_validation(ctx, 0.3)
    assert len(np.intersect1d(crafting, held)) == 0 and len(crafting) + len(held) == len(digits.y_val)
    per_class = np.bincount(digits.y_val[held], minlength=10) / np.bincount(digits.y_val, minlength=10)
    assert np.allclose(per_class, 0.3, atol=0.03)
    run, objective = ctx.make(0)
    final = run.run()
    named = run.named_tensors(final.params, final.buffers)
    logits = run.predict(final.params, final.buffers, torch.as_tensor(digits.x_val[held], dtype=run.dtype))
    expected = torch.nn.functional.cross_entropy(logits, torch.as_tensor(digits.y_val[held]))
    assert float(S._objective_on(objective, held)(named)) == pytest.approx(float(expected), rel=1e-5)
    _, _, history = S.mgd_select(ctx, S.MGDSettings(meta_steps=1, holdout=0.3, seeds_per_step=1))
    # the descent's objective is the crafting part's loss, not the whole split's
    assert history[0]["val_objective"] == pytest.approx(float(S._objective_on(objective, crafting)(named)), rel=1e-5)


def test_mgd_selection_killed_mid_descent_resumes_to_the_same_result(digits, tmp_path):
    from mgd.runs import RunDirectory

    pool = S.corrupt_pool(replace(digits, x_train=digits.x_train[:200], y_train=digits.y_train[:200]),
                          label_noise=0.3, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=10, width=8, batch_size=20).resolved(), pool, 100, [0, 1, 2],
                             run_seconds=0.1)
    settings = S.MGDSettings(meta_steps=4, seeds_per_step=1)
    whole = S.mgd_select(ctx, settings)

    class Killed(Exception):
        pass

    calls = []

    def kill_after_two(phase, n):
        calls.append(phase)
        if calls.count("meta") == 2:
            raise Killed

    store = RunDirectory.create(tmp_path / "run", command="select", config={})
    with pytest.raises(Killed):
        S.mgd_select(ctx, settings, store=store, progress=kill_after_two)
    resumed_meta = []
    again = S.mgd_select(ctx, settings, store=store, progress=lambda phase, n: resumed_meta.append(n))
    assert resumed_meta[0] == 2  # it continued after the two saved meta-steps
    assert np.array_equal(again[0].y_train, whole[0].y_train) and np.array_equal(again[0].x_train, whole[0].x_train)
    assert np.array_equal(again[1].meta["data_weights"], whole[1].meta["data_weights"])
    assert [h["val_objective"] for h in again[2]] == [h["val_objective"] for h in whole[2]]
