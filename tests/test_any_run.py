"""Any PyTorch training run: a model zoo, user losses and data, randomness, frozen parameters.

Every metagradient path is checked in float64 against independent references: the full
unroll (plain autograd through every step), central finite differences of whole training
runs, REPLAY against store-everything bit for bit in every VJP mode, and, where no randomness
is involved, a plain ``torch.optim`` loop for the training itself.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgd
from mgd.check import directional_finite_difference, full_unroll_metagradient, relative_error
from mgd.replay import VJP_MODES
from mgd.step_vjp import MixedModeFallback

from conftest import digits_split

DTYPE = torch.float64


# ------------------------------------------------------------------------------- the zoo


class Rows(nn.Module):
    """An 8x8 digit as a sequence of 8 rows of 8 features."""

    def forward(self, x):
        return x.reshape(len(x), 8, 8)


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = Rows()
        self.lstm = nn.LSTM(8, 10, batch_first=True)
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        out, _ = self.lstm(self.rows(x))
        return self.head(out[:, -1])


class CausalAttention(nn.Module):
    """One causal self-attention layer through ``scaled_dot_product_attention``."""

    def __init__(self, width=12, heads=2):
        super().__init__()
        self.rows, self.heads = Rows(), heads
        self.embed = nn.Linear(8, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(self.rows(x))
        b, n, w = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, w)
        return self.head((h + a).mean(dim=1))


class Normalised(nn.Module):
    """An MLP behind a constant input normalisation kept in registered buffers."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def zoo_model(name: str, digits) -> nn.Module:
    torch.manual_seed(0)
    if name == "groupnorm":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    elif name == "layernorm":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 10))
    elif name == "lstm":
        model = LSTMHead()
    elif name == "attention":
        model = CausalAttention()
    elif name == "buffers":
        x = torch.as_tensor(digits.x_train, dtype=DTYPE)
        model = Normalised(x.mean(dim=0), x.std(dim=0) + 0.1)
    elif name == "batchnorm":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 10))
    elif name == "dropout":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 10))
    else:  # pragma: no cover
        raise KeyError(name)
    return model.to(DTYPE)


ZOO = ("groupnorm", "layernorm", "lstm", "attention", "buffers", "dropout")
DETERMINISTIC = ("groupnorm", "layernorm", "lstm", "attention", "buffers")


def zoo_run(name, digits, *, optimizer=None, steps=6, batch_size=20, lr=0.1, **options):
    model = zoo_model(name, digits)
    train, val = digits_split(digits)
    run = mgd.make_run(
        model, optimizer=optimizer or mgd.SGD(momentum=0.9), data=train, steps=steps, batch_size=batch_size,
        lr=lr, metaparams=["data_weights", "lr"], **options,
    )
    return run, mgd.Objective(run.stateless, val, batch_size=16)


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedModeFallback)
        warnings.simplefilter("ignore", mgd.replay.FusedFallback)
        return fn(*args, **kwargs)


def unit(n, seed):
    d = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def fd_error(run, objective, grads, name, seed=0):
    """Best relative error of the directional derivative against central differences."""
    d = unit(grads[name].numel(), seed).view_as(grads[name])
    exact = float((grads[name] * d).sum())
    errors = [
        abs(directional_finite_difference(run, objective, run.default_meta(), {name: d}, h) - exact) / abs(exact)
        for h in (1e-4, 1e-5)
    ]
    return min(errors)


def assert_exact(run, objective, result=None, keys=("data_weights", "lr"), fd=True):
    """The metagradient (default plan, unless given) against the full unroll and, with
    ``fd``, central finite differences of whole runs."""
    result = result or quietly(mgd.metagradient, run, objective)
    value, expected = full_unroll_metagradient(run, objective)
    assert result.value == pytest.approx(value, rel=1e-12)
    for key in keys:
        assert relative_error(result.grads[key], expected[key]) <= 1e-8, key
        if fd:
            assert fd_error(run, objective, result.grads, key) <= 1e-6, key
    return result


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ZOO)
def test_zoo_replay_equals_store_everything_bit_for_bit_in_every_vjp_mode(digits, name):
    run, objective = zoo_run(name, digits)
    for vjp in VJP_MODES:
        replay = quietly(mgd.metagradient, run, objective, k=2, vjp=vjp)
        stored = quietly(mgd.metagradient, run, objective, mode="unrolled", vjp=vjp)
        for key in ("data_weights", "lr"):
            assert torch.equal(replay.grads[key], stored.grads[key]), (vjp, key)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_the_full_unroll_and_finite_differences(digits, name):
    run, objective = zoo_run(name, digits)
    assert_exact(run, objective)  # the default plan and VJP


def test_zoo_adamw_matches_the_full_unroll(digits):
    # Adam's early steps are nearly sign(g): finite differences of data weights are
    # ill-conditioned there, so the unroll is the reference (and lr by differences).
    for name in ("layernorm", "dropout"):
        run, objective = zoo_run(name, digits, optimizer=mgd.Adam(decoupled=True), lr=0.01, weight_decay=0.1)
        result = mgd.metagradient(run, objective)
        _, expected = full_unroll_metagradient(run, objective)
        for key in ("data_weights", "lr"):
            assert relative_error(result.grads[key], expected[key]) <= 1e-8, (name, key)
        assert fd_error(run, objective, result.grads, "lr") <= 1e-6


def _torch_optim_val_loss(model, train, val, run, *, momentum=0.9, lr=0.1, clip=None, schedule=None, frozen=()):
    """Train a copy of ``model`` with torch.optim on the run's batch order; val cross-entropy."""
    model = copy.deepcopy(model)
    params = [p for n, p in model.named_parameters() if n not in frozen and p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(min(t, run.steps - 1), run.steps)) if schedule else None
    x, y = train
    for t in range(run.steps):
        index = run.batch_indices(t)  # the batch order is an input of both runs
        opt.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(val[0]), val[1]))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_zoo_training_matches_a_plain_torch_optim_loop(digits, name):
    run, objective = zoo_run(name, digits, steps=12)
    final = run.run()
    ours = float(objective(run.named_tensors(final.params, final.buffers)))
    train, val = digits_split(digits)
    assert ours == pytest.approx(_torch_optim_val_loss(zoo_model(name, digits), train, val, run), rel=1e-10, abs=1e-10)


def test_schedule_and_clipping_match_torch_optim_and_are_differentiated_exactly(digits):
    schedule = mgd.schedules.warmup_cosine(3, final=0.1)
    run, objective = zoo_run("layernorm", digits, steps=10, schedule=schedule, clip_norm=0.5)
    final = run.run()
    ours = float(objective(run.named_tensors(final.params, final.buffers)))
    train, val = digits_split(digits)
    reference = _torch_optim_val_loss(zoo_model("layernorm", digits), train, val, run, clip=0.5, schedule=schedule)
    assert ours == pytest.approx(reference, rel=1e-10)
    assert_exact(run, objective)


def test_clip_vjp_matches_autograd():
    from mgd.step import clip_by_global_norm, clip_vjp

    g = torch.randn(30, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    bar = torch.randn(30, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    for max_norm in (0.3, 1e6):  # clipped, and not
        leaf = g.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(clip_by_global_norm(leaf, max_norm), leaf, bar)
        assert relative_error(clip_vjp(g, bar, max_norm), expected) <= 1e-13


def test_micro_batches_give_the_same_run_and_exact_metagradients(digits):
    chunked, objective_c = zoo_run("dropout", digits, batch_size=20, micro_batch=6)
    inputs = chunked.step_inputs(0, chunked.local_meta(chunked.default_meta(), 0))
    assert chunked.chunks(inputs) == [(0, 6), (6, 12), (12, 18), (18, 20)]
    # BatchNorm statistics chain through the micro-batches (the reverse pass carries their
    # adjoint back through them, last micro-batch first)
    bn, obj_bn = zoo_run("batchnorm", digits, micro_batch=6)
    for vjp in VJP_MODES:
        replay = quietly(mgd.metagradient, bn, obj_bn, k=2, vjp=vjp)
        stored = quietly(mgd.metagradient, bn, obj_bn, mode="unrolled", vjp=vjp)
        for key in ("data_weights", "lr"):
            assert torch.equal(replay.grads[key], stored.grads[key]), (vjp, key)
    assert_exact(bn, obj_bn, replay)
    # dropout draws per micro-batch, so compare deterministic models for the same trajectory
    det, obj_d = zoo_run("layernorm", digits)
    det_c, obj_dc = zoo_run("layernorm", digits, micro_batch=6)
    a, b = det.run(), det_c.run()
    assert relative_error(b.params, a.params) <= 1e-13
    for run, obj in ((chunked, objective_c), (det_c, obj_dc)):
        result = mgd.metagradient(run, obj)
        _, expected = full_unroll_metagradient(run, obj)
        for vjp in VJP_MODES:
            other = quietly(mgd.metagradient, run, obj, k=3, vjp=vjp)
            stored = quietly(mgd.metagradient, run, obj, mode="unrolled", vjp=vjp)
            for key in ("data_weights", "lr"):
                assert torch.equal(other.grads[key], stored.grads[key])
                assert relative_error(other.grads[key], expected[key]) <= 1e-8
        assert relative_error(result.grads["data_weights"], expected["data_weights"]) <= 1e-8


# ------------------------------------------------------------------------------- the four problems


def test_frozen_parameters_stay_frozen_and_match_torch_optim(digits):
    """Regression: a layer with requires_grad=False used to be trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).to(DTYPE)
    model[1].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train, val = digits_split(digits)
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=train, steps=12, batch_size=20, lr=0.1,
                       metaparams=["data_weights", "lr"])
    assert run.num_params == 12 * 10 + 10  # the state holds the trainable layer only
    assert run.init_state().params.numel() == run.num_params
    objective = mgd.Objective(run.stateless, val)
    final = run.run()
    ours = float(objective(run.named_tensors(final.params, final.buffers)))
    reference = _torch_optim_val_loss(model, train, val, run)
    assert ours == pytest.approx(reference, rel=1e-10)
    assert_exact(run, objective)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
    for n, p in run.stateless.frozen_tensors().items():
        assert torch.equal(p, frozen[n])


def test_dropout_metagradient_is_exact_under_store_everything(digits):
    """Regression: with dropout, store-everything returned a wrong metagradient silently."""
    run, objective = zoo_run("dropout", digits)
    assert_exact(run, objective, mgd.metagradient(run, objective, mode="unrolled"))


def test_run_equals_plain_steps_that_apply_every_kind(digits):
    """run() skips kinds at an exact identity and seeds the RNG without restoring it per step;
    neither may change a bit against steps that apply every kind, each in its own RNG block."""
    run = zoo_run("dropout", digits)[0].replaced(metaparams=["data_weights", "lr", "lr_knots", "weight_decay"])
    meta = run.check_meta({})
    assert run.neutral_kinds(meta) == {"data_weights", "lr", "lr_knots"}  # weight decay: never skipped
    state = run.init_state()
    for _ in range(run.steps):
        state = run.take_step(state, meta).state
    final = run.run()
    assert all(torch.equal(a, b) for a, b in zip(final.tensors(), state.tensors()))
    changed = {**meta, "data_weights": meta["data_weights"].clone().index_fill_(0, torch.tensor([3]), 2.0),
               "lr": meta["lr"] * 0.5, "lr_knots": meta["lr_knots"] + 0.1}
    assert run.neutral_kinds(changed) == frozenset()
    assert not torch.equal(run.run(changed).params, final.params)


def test_run_never_bypasses_an_update_a_subclass_overrides(digits):
    """run() writes states in place through the optimizer's update_in_place, but only when the
    class that defines update defines it too."""

    @dataclass(frozen=True)
    class Frozen(mgd.SGD):
        def update(self, grad, params, state, **kwargs):
            return params.clone(), tuple(t.clone() for t in state)

    run, _ = zoo_run("layernorm", digits, optimizer=Frozen(momentum=0.9))
    assert torch.equal(run.run().params, run.init_state().params)
    trained, _ = zoo_run("layernorm", digits)
    assert not torch.equal(trained.run().params, trained.init_state().params)


def test_dropout_masks_repeat_and_the_global_rng_is_untouched(digits):
    run, _ = zoo_run("dropout", digits)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run.run()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)  # another global state: the run does not depend on it
    b = run.run()
    assert torch.equal(a.params, b.params)
    other, _ = zoo_run("dropout", digits, seed=1)
    assert not torch.equal(other.run().params, a.params)


def test_groupnorm_works_with_the_default_fused_vjp(digits):
    """Regression: the fused path raised ReplayDivergedError on every GroupNorm model."""
    run, objective = zoo_run("groupnorm", digits, steps=9)
    with pytest.warns(mgd.replay.FusedFallback):  # GroupNorm's CPU kernels: detected, not an error
        result = mgd.metagradient(run, objective)  # vjp="fused", the default
    assert result.vjp == "double-backward"
    _, expected = full_unroll_metagradient(run, objective)
    for key in ("data_weights", "lr"):
        assert relative_error(result.grads[key], expected[key]) <= 1e-8


def test_constant_buffers_are_accepted_and_in_place_writes_refused(digits):
    """Regression: a registered constant buffer (input normalisation) used to be refused."""
    run, objective = zoo_run("buffers", digits)
    assert run.init_state().buffers.numel() == 0  # constants are not state
    result = mgd.metagradient(run, objective)
    _, expected = full_unroll_metagradient(run, objective)
    assert relative_error(result.grads["data_weights"], expected["data_weights"]) <= 1e-8

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1, dtype=DTYPE))
            self.lin = nn.Linear(64, 10).to(DTYPE)

        def forward(self, x):
            self.calls += 1
            return self.lin(x.flatten(1))

    model = Counting()
    train, _ = digits_split(digits)
    bad = mgd.make_run(model, optimizer=mgd.SGD(), data=train, steps=2, batch_size=20, lr=0.1)
    with pytest.raises(mgd.UserError, match="buffer 'calls' in place"):
        bad.run()
    assert float(model.calls) == 0  # the user's module is never written


# ------------------------------------------------------------------------------- data and losses


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, noisy=False):
        self.x, self.y, self.noisy, self.reads = x, y, noisy, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        x = self.x[i] + (self.reads * 1e-3 if self.noisy else 0.0)
        return {"pixels": x, "label": self.y[i]}


def _dict_loss(outputs, batch):
    return F.cross_entropy(outputs, batch["label"], reduction="none")


def test_a_dataset_with_dict_items_gives_the_same_run_as_tensors(digits):
    (x, y), val = digits_split(digits)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).to(DTYPE)
    common = dict(optimizer=mgd.SGD(momentum=0.9), steps=8, batch_size=20, lr=0.1, metaparams=["data_weights"])
    tensors = mgd.make_run(model, data=(x, y), **common)
    dataset = mgd.make_run(model, data=PairDataset(x, y), loss=_dict_loss, inputs=lambda b: ((b["pixels"],), {}), **common)
    assert torch.equal(tensors.run().params, dataset.run().params)
    objective = mgd.Objective(dataset.stateless, val)
    a = mgd.metagradient(tensors, objective).grads["data_weights"]
    b = mgd.metagradient(dataset, objective).grads["data_weights"]
    assert torch.equal(a, b)


def test_augmentation_replays_and_is_differentiated_exactly(digits):
    from mgd.images import RandomCropFlip

    run, objective = zoo_run("groupnorm", digits, augment=RandomCropFlip(padding=1, field=0))
    a, b = run.run(), run.run()
    assert torch.equal(a.params, b.params)
    plain, _ = zoo_run("groupnorm", digits)
    assert not torch.equal(plain.run().params, a.params)  # the crops changed training
    replay = quietly(mgd.metagradient, run, objective, k=2)
    stored = mgd.metagradient(run, objective, mode="unrolled")
    _, expected = full_unroll_metagradient(run, objective)
    for key in ("data_weights", "lr"):
        assert torch.equal(replay.grads[key], stored.grads[key])
        assert relative_error(replay.grads[key], expected[key]) <= 1e-8
        assert fd_error(run, objective, replay.grads, key) <= 1e-6


def test_poisons_on_a_dict_field_of_a_dataset(digits):
    from mgd.apps.poison import PoisonInputs

    (x, y), val = digits_split(digits)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).to(DTYPE)
    kind = PoisonInputs(torch.zeros((), dtype=DTYPE), torch.ones((), dtype=DTYPE), field="pixels")
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=PairDataset(x, y), loss=_dict_loss,
                       inputs=lambda b: ((b["pixels"],), {}), steps=6, batch_size=20, lr=0.1, metaparams=[kind])
    objective = mgd.Objective(run.stateless, val)
    result = mgd.metagradient(run, objective)
    assert result.grads["poison_inputs"].shape == x.shape
    _, expected = full_unroll_metagradient(run, objective)
    assert relative_error(result.grads["poison_inputs"], expected["poison_inputs"]) <= 1e-8
    assert fd_error(run, objective, result.grads, "poison_inputs") <= 1e-6


def test_per_token_weights_and_masks_in_the_lm_loss():
    logits = torch.randn(2, 4, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    weights = torch.tensor([[1.0, 1.0, 2.0, 0.5], [1.0, 3.0, 1.0, 1.0]], dtype=DTYPE)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "w": weights}
    losses = mgd.losses.causal_lm(token_weights="w")(logits, batch)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 5), ids[:, 1:].reshape(-1), reduction="none").view(2, 3)
    expected0 = (ce[0] * weights[0, 1:]).sum() / 3
    expected1 = (ce[1, 0] * weights[1, 1]) / 1  # only the first target is valid
    assert torch.allclose(losses, torch.stack([expected0, expected1]), rtol=1e-14)


# ------------------------------------------------------------------------------- bad input


def test_bad_runs_are_user_errors_naming_the_fix(digits):
    (x, y), val = digits_split(digits)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(DTYPE)
    common = dict(optimizer=mgd.SGD(), steps=3, batch_size=10, lr=0.1)

    with pytest.raises(mgd.UserError, match="one value per example"):
        mgd.make_run(model, data=(x, y), loss=lambda out, b: F.cross_entropy(out, b[1]), **common).run()
    with pytest.raises(mgd.UserError, match="NaN or infinite at step 0"):
        mgd.make_run(model, data=(x, y), loss=lambda out, b: out.sum(1) * math.inf, **common).run()
    with pytest.raises(mgd.UserError, match="not the DataLoader"):
        mgd.make_run(model, data=torch.utils.data.DataLoader(PairDataset(x, y)), **common)
    with pytest.raises(mgd.UserError, match="different values for the same index"):
        mgd.make_run(model, data=PairDataset(x, y, noisy=True), loss=_dict_loss,
                     inputs=lambda b: ((b["pixels"],), {}), **common)
    with pytest.raises(mgd.UserError, match="float32 or float64"):
        mgd.make_run(copy.deepcopy(model).to(torch.bfloat16), data=(x.bfloat16(), y), **common)
    with pytest.raises(mgd.UserError, match="selects nothing"):
        mgd.make_run(model, data=(x, y), trainable=lambda name, p: False, **common)
    run = mgd.make_run(model, data=(x, y), metaparams=["data_weights"], **common)
    with pytest.raises(mgd.UserError, match="one weight per training example"):
        run.check_meta({"data_weights": torch.ones(len(x) + 1)})

    class OnceOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.tanh()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return g * (1 - t.tanh() ** 2)

    fused_kernel = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(DTYPE)
    fused_kernel.register_forward_hook(lambda m, a, out: OnceOnly.apply(out))
    run = mgd.make_run(fused_kernel, data=(x, y), **common)
    with pytest.raises(mgd.UserError, match="no double backward"):
        mgd.metagradient(run, mgd.Objective(run.stateless, val), mode="unrolled")


def test_tf32_is_refused_on_cuda():
    from mgd.step import refuse_tf32

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(mgd.UserError, match="allow_tf32 = False"):
            refuse_tf32(torch.device("cuda"), torch.float32)
        refuse_tf32(torch.device("cuda"), torch.float64)  # float64 never uses TF32
        refuse_tf32(torch.device("cpu"), torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------------------- transformers


def _tiny_gpt2(dropout=0.0, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=12, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    return model.to(DTYPE)


def _token_data(n=24, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length - 4 :] = 0  # padded documents
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_gpt2_with_tied_embeddings_matches_torch_optim_and_finite_differences():
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # the transformers default
    data, val = _token_data(), _token_data(8, seed=2)
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=data, steps=6, batch_size=6, lr=0.3,
                       loss=mgd.losses.causal_lm(), metaparams=["data_weights", "lr"])
    assert run.num_params == sum(p.numel() for p in model.parameters())  # the tied matrix once
    objective = mgd.Objective(run.stateless, val, loss=mgd.losses.causal_lm(), batch_size=4)
    final = run.run()
    ours = float(objective(run.named_tensors(final.params, final.buffers)))

    # torch.optim on a copy: one parameter, one momentum buffer, the sum of both uses' gradients
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9)
    loss = mgd.losses.causal_lm()
    for t in range(run.steps):
        index = run.batch_indices(t)
        batch = {k: v[index] for k, v in data.items()}
        opt.zero_grad()
        out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss(out, batch).mean().backward()
        opt.step()
    reference.eval()
    with torch.no_grad():
        expected = float(loss(reference(input_ids=val["input_ids"], attention_mask=val["attention_mask"]), val).mean())
    assert ours == pytest.approx(expected, rel=1e-10)

    result = mgd.metagradient(run, objective)
    for key in ("data_weights", "lr"):
        assert fd_error(run, objective, result.grads, key) <= 1e-6, key


def test_gpt2_with_dropout_and_lora_replays_exactly():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _tiny_gpt2(dropout=0.1),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True),
    )
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data, val = _token_data(), _token_data(8, seed=2)
    run = mgd.make_run(model, optimizer=mgd.Adam(decoupled=True), data=data, steps=5, batch_size=6, lr=1e-2,
                       weight_decay=0.1, loss=mgd.losses.causal_lm(), clip_norm=1.0, micro_batch=4,
                       schedule=mgd.schedules.warmup_cosine(2), metaparams=["data_weights", "lr"])
    assert run.num_params == adapter
    assert run.init_state().nbytes() == 3 * adapter * 8  # adapter and two Adam moments, float64
    objective = mgd.Objective(run.stateless, val, loss=mgd.losses.causal_lm(), batch_size=4)
    replay = mgd.metagradient(run, objective, k=2)
    stored = mgd.metagradient(run, objective, mode="unrolled")
    _, expected = full_unroll_metagradient(run, objective)
    for key in ("data_weights", "lr"):
        assert torch.equal(replay.grads[key], stored.grads[key])
        assert relative_error(replay.grads[key], expected[key]) <= 1e-8
    assert fd_error(run, objective, replay.grads, "lr") <= 1e-6
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
