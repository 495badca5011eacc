"""The paper's data-selection surrogate (``pool_injection``) and MGD selection along it.

The surrogate's metagradient is checked in float64 against the full unroll, central finite
differences of whole runs, and central differences of a plain ``torch.optim`` loop that adds
the injected term itself (a reference that shares no code with the step).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgd
from mgd.apps import select as S
from mgd.check import directional_finite_difference, full_unroll_metagradient, relative_error
from mgd.cli.main import main
from mgd.config import RunConfig
from mgd.descent import Box, SignedStep, descend
from mgd.metaparams import PoolInjection
from mgd.replay import VJP_MODES

from conftest import digits_split

DTYPE = torch.float64
STEPS, BATCH, LR, INJECT = 8, 20, 0.1, 5


def _model(batchnorm=False):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(12) if batchnorm else nn.LayerNorm(12)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), norm, nn.GELU(), nn.Linear(12, 10)).to(DTYPE)


def _run(digits, model=None, metaparams=None):
    model = model or _model()
    train, val = digits_split(digits)
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=train, steps=STEPS, batch_size=BATCH, lr=LR,
                       metaparams=metaparams or ["data_weights", PoolInjection(INJECT)])
    return run, mgd.Objective(run.stateless, val, batch_size=16)


def _counts(n=60):
    counts = torch.ones(n, dtype=DTYPE)
    counts[:10], counts[10:15] = 0.0, 2.0  # dropped examples and doubled ones
    return counts


def test_surrogate_matches_the_unroll_and_finite_differences_and_replays_bit_for_bit(digits):
    run, objective = _run(digits)
    meta = {"data_weights": _counts()}
    wrt = ["pool_injection"]
    result = mgd.metagradient(run, objective, meta, wrt=wrt)
    g = result.grads["pool_injection"]
    _, expected = full_unroll_metagradient(run, objective, meta, wrt=wrt)
    assert relative_error(g, expected["pool_injection"]) <= 1e-12
    d = torch.randn(60, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    d /= d.norm()
    exact = float(g @ d)
    errors = [abs(directional_finite_difference(run, objective, meta, {"pool_injection": d}, h) - exact) / abs(exact)
              for h in (1e-4, 1e-5)]
    assert min(errors) <= 1e-8
    # every example is scored, the dropped ones (weight 0) too
    assert bool((g[:10].abs() > 0).all())
    for vjp in VJP_MODES:
        stored = mgd.metagradient(run, objective, meta, wrt=wrt, mode="unrolled", vjp=vjp)
        replay = mgd.metagradient(run, objective, meta, wrt=wrt, k=2, vjp=vjp)
        assert torch.equal(replay.grads["pool_injection"], stored.grads["pool_injection"]), vjp
    # nothing before the injection step depends on z: the truncated pass is the same pass
    truncated = mgd.metagradient(run, objective, meta, wrt=wrt, horizon=STEPS - INJECT)
    assert torch.equal(truncated.grads["pool_injection"], g)


def test_injection_at_zero_leaves_the_run_as_it_was(digits):
    run, _ = _run(digits)
    plain, _ = _run(digits, metaparams=["data_weights"])
    meta = {"data_weights": _counts()}
    injected, reference = run.run(meta), plain.run(dict(meta))
    assert torch.allclose(injected.params, reference.params, rtol=1e-13, atol=1e-15)


def _torch_optim_val_loss(digits, counts, z):
    """SGD with momentum via torch.optim on the run's batch order, the injected term added by hand."""
    run, _ = _run(digits)
    model = copy.deepcopy(_model())
    (x, y), (xv, yv) = digits_split(digits)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for t in range(STEPS):
        index = run.batch_indices(t)
        opt.zero_grad()
        loss = (counts[index] * F.cross_entropy(model(x[index]), y[index], reduction="none")).sum() / BATCH
        if t == INJECT:
            loss = loss + (z * F.cross_entropy(model(x), y, reduction="none")).sum() / BATCH
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(xv), yv))


def test_surrogate_matches_differences_of_a_plain_torch_optim_loop(digits):
    run, objective = _run(digits)
    counts = _counts()
    g = mgd.metagradient(run, objective, {"data_weights": counts}, wrt=["pool_injection"]).grads["pool_injection"]
    zero = torch.zeros(60, dtype=DTYPE)
    final = run.run({"data_weights": counts})
    ours = float(objective(run.named_tensors(final.params, final.buffers)))
    assert ours == pytest.approx(_torch_optim_val_loss(digits, counts, zero), rel=1e-12)
    d = torch.randn(60, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    d /= d.norm()
    h = 1e-5
    fd = (_torch_optim_val_loss(digits, counts, h * d) - _torch_optim_val_loss(digits, counts, -h * d)) / (2 * h)
    assert abs(fd - float(g @ d)) <= 1e-7 * abs(float(g @ d))


def test_injection_refuses_batchnorm_and_steps_past_the_run(digits):
    with pytest.raises(mgd.UserError, match="BatchNorm"):
        _run(digits, model=_model(batchnorm=True))
    with pytest.raises(mgd.UserError, match="past the run's last step"):
        _run(digits, metaparams=["data_weights", PoolInjection(STEPS)])
    with pytest.raises(mgd.UserError, match="integer >= 0"):
        PoolInjection(-1)


def test_descent_can_follow_another_metaparameters_gradient(digits):
    run, objective = _run(digits)
    counts = _counts()
    step = SignedStep(1.0, mask_prob=1.0)
    state = descend(lambda seed: (run, objective), {"data_weights": counts}, optimizer=step,
                    projections={"data_weights": Box(0.0, None)}, steps=1, seeds=[0],
                    gradient_from={"data_weights": "pool_injection"}, horizon=STEPS - INJECT)
    g = mgd.metagradient(run, objective, {"data_weights": counts}, wrt=["pool_injection"]).grads["pool_injection"]
    assert torch.equal(state.z["data_weights"], (counts - torch.sign(g)).clamp_min(0.0))
    with pytest.raises(mgd.UserError, match="not being optimised"):
        descend(lambda seed: (run, objective), {"data_weights": counts}, optimizer=step, steps=1, seeds=[0],
                gradient_from={"lr": "pool_injection"})


def test_mgd_selection_along_the_surrogate(digits, tmp_path):
    pool = S.corrupt_pool(digits, label_noise=0.3, seed=0)
    ctx = S.SelectionContext(RunConfig(steps=10, width=8, batch_size=20).resolved(), pool, 100, [0, 1],
                             run_seconds=0.1)
    settings = S.MGDSettings(meta_steps=2, seeds_per_step=1, gradient="surrogate", inject_at=0.5)
    selection, _, history = S.mgd_select(ctx, settings)
    assert len(selection.y_train) == 100 and len(history) == 3
    assert selection.info["hyperparameters"]["gradient"] == "surrogate"
    with pytest.raises(mgd.UserError, match="unknown MGD selection gradient"):
        S.MGDSettings(gradient="sideways")
    with pytest.raises(mgd.UserError, match="fraction of training"):
        S.MGDSettings(gradient="surrogate", inject_at=1.0)
    out = tmp_path / "run"
    assert main(["select", "--dataset", "digits", "--methods", "random,mgd", "--mgd-gradient", "surrogate",
                 "--meta-steps", "1", "--seeds-per-step", "1", "--steps", "20", "--width", "8",
                 "--eval-seeds", "100", "--crafting-seeds", "0,1", "--quiet", "--out", str(out)]) == 0
