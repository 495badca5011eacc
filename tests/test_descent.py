"""MGD: meta-optimizers, projections, and descent that really lowers held-out loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mgd
from mgd.corruption import label_noise
from mgd.descent import (
    Box,
    Chain,
    FixedTotal,
    IntegerCounts,
    LInfBall,
    MetaAdam,
    SignedStep,
    descend,
    state_from_arrays,
    state_to_arrays,
)

from conftest import tiny_problem


def test_signed_step_and_mask_are_deterministic():
    z = torch.zeros(1000, dtype=torch.float64)
    g = torch.randn(1000, dtype=torch.float64)
    full, _ = SignedStep(0.5).update(g, z, (), step=0)
    assert torch.equal(full, -0.5 * torch.sign(g))
    masked = SignedStep(0.5, mask_prob=0.2, mask_seed=3)
    a, _ = masked.update(g, z, (), step=7)
    b, _ = masked.update(g, z, (), step=7)
    c, _ = masked.update(g, z, (), step=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.15 < (a != 0).double().mean() < 0.25


def test_meta_adam_first_step_is_lr_times_sign():
    z = torch.zeros(5, dtype=torch.float64)
    g = torch.tensor([1e-9, -3.0, 2.0, -1e-5, 4.0], dtype=torch.float64)
    optimizer = MetaAdam(0.05, eps=1e-12)
    new, state = optimizer.update(g, z, optimizer.init(z), step=0)
    assert torch.allclose(new, -0.05 * torch.sign(g), rtol=1e-3)


def test_projections():
    z = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    assert torch.equal(Box(0.0, 2.0)(z), torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64))
    ball = LInfBall(torch.zeros(3, dtype=torch.float64), 0.6)
    assert torch.equal(ball(z), torch.tensor([-0.6, 0.5, 0.6], dtype=torch.float64))
    assert torch.equal(IntegerCounts()(torch.tensor([-0.7, 1.4, 2.6])), torch.tensor([0.0, 1.0, 3.0]))
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(200, generator=generator, dtype=torch.float64) + 1
    projected = FixedTotal(150.0)(w)
    assert projected.min() >= 0 and projected.sum() == pytest.approx(150.0, abs=1e-9)
    # it is the Euclidean projection: closer to w than another feasible point
    other = torch.full_like(w, 0.75)
    assert (projected - w).norm() <= (other - w).norm()
    counts = FixedTotal(100.0, upper=1.0, integer=True)(w)
    assert counts.sum() == 100 and set(counts.unique().tolist()) <= {0.0, 1.0}
    chained = Chain((Box(0.0, None), FixedTotal(3.0)))(z)
    assert chained.sum() == pytest.approx(3.0)


def test_impossible_projection_is_a_user_error():
    with pytest.raises(mgd.UserError, match="cannot be met"):
        FixedTotal(500.0, upper=1.0).check(torch.ones(100))
    with pytest.raises(mgd.UserError, match="empty box"):
        Box(1.0, 0.0).check(torch.ones(3))


def test_state_round_trip():
    z = {"data_weights": torch.rand(10, dtype=torch.float64)}
    state = descend_tiny_state = mgd.descent.DescentState(
        3, z, {"data_weights": (torch.rand(10, dtype=torch.float64),)}, 2, 0.5, {"data_weights": z["data_weights"] * 2}
    )
    back = state_from_arrays(*state_to_arrays(descend_tiny_state), like=z)
    assert back.step == 3 and back.best_step == 2 and back.best_value == 0.5
    assert torch.equal(back.z["data_weights"], state.z["data_weights"])
    assert torch.equal(back.opt_state["data_weights"][0], state.opt_state["data_weights"][0])
    with pytest.raises(mgd.UserError, match="corrupt"):
        arrays, meta = state_to_arrays(state)
        del arrays["z/data_weights"]
        state_from_arrays(arrays, meta, like=z)


def test_reweighting_a_noisy_pool_lowers_validation_and_test_loss(digits):
    """The issue's bar on a tiny config: 30% label noise, 20 meta-steps of signed steps."""
    noisy, corrupted = label_noise(digits.y_train[:300], 0.3, 10, seed=0)
    dtype = torch.float64
    xte = torch.as_tensor(digits.x_test, dtype=dtype)
    yte = torch.as_tensor(digits.y_test)

    noisy_digits = dataclasses.replace(digits, y_train=np.concatenate([noisy, digits.y_train[300:]]))

    def make(seed):
        return tiny_problem(
            noisy_digits, mgd.SGD(momentum=0.9), steps=60, n_train=300, batch_size=50, seed=seed,
            metaparams=("data_weights",),
        )

    def test_loss(weights, seeds=(100, 101, 102)):
        losses = []
        for seed in seeds:
            trainer, _ = make(seed)
            final = trainer.run({"data_weights": weights})
            losses.append(float(torch.nn.functional.cross_entropy(trainer.predict(final.params, final.buffers, xte), yte)))
        return float(np.mean(losses))

    history = []
    ones = torch.ones(300, dtype=dtype)
    state = descend(
        make, {"data_weights": ones}, optimizer=SignedStep(0.1), projections={"data_weights": Box(0.0, None)},
        steps=20, seeds=[0, 1, 2, 3, 4], on_step=lambda record, state: history.append(record),
    )
    values = [r.value for r in history]
    assert len(values) == 21
    assert values[-1] < 0.8 * values[0]
    # monotone-ish: the value falls in most meta-steps despite the rotating seeds
    assert np.mean(np.diff(values) < 0) >= 0.7, values
    assert state.best_step >= 10
    w = state.best_z["data_weights"].numpy()
    assert w[corrupted].mean() < 0.7 * w[~corrupted].mean()  # diagnostics: noise down-weighted
    assert test_loss(state.best_z["data_weights"]) < 0.9 * test_loss(ones)


def test_seeds_per_step_averages_the_metagradients_of_consecutive_seeds(digits):
    """One averaged meta-step equals the mean of the single-seed metagradients, computed apart."""
    from mgd.replay import metagradient

    def make(seed):
        return tiny_problem(digits, mgd.SGD(momentum=0.9), steps=8, seed=seed, metaparams=("data_weights",))

    ones = torch.ones(120, dtype=torch.float64)
    records = []
    descend(make, {"data_weights": ones}, optimizer=MetaAdam(0.1), steps=2, seeds=[3, 4, 5, 6],
            seeds_per_step=2, on_step=lambda record, state: records.append(record))
    singles = [metagradient(*make(seed), {"data_weights": ones}, wrt=["data_weights"]) for seed in (3, 4)]
    mean_grad = (singles[0].grads["data_weights"] + singles[1].grads["data_weights"]) / 2
    assert records[0].value == pytest.approx((singles[0].value + singles[1].value) / 2, rel=1e-14)
    assert records[0].grad_norms["data_weights"] == pytest.approx(float(mean_grad.norm()), rel=1e-12)
    # the second meta-step uses the next two seeds, the final evaluation the two after
    assert [r.seed for r in records] == [3, 5, 3]
    # a single-seed metagradient has another norm: the average is not one seed's in disguise
    assert abs(float(singles[0].grads["data_weights"].norm()) - float(mean_grad.norm())) > 1e-6
    with pytest.raises(mgd.UserError, match="seeds per meta-step"):
        descend(make, {"data_weights": ones}, optimizer=MetaAdam(0.1), steps=1, seeds=[0], seeds_per_step=2)
