"""The re-implemented optimizers match torch.optim over hundreds of steps (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mgd

STEPS = 300

CASES = [
    ("sgd", dict(momentum=0.0), dict(momentum=0.0), 0.0),
    ("sgd", dict(momentum=0.9), dict(momentum=0.9), 0.0),
    ("sgd", dict(momentum=0.9), dict(momentum=0.9), 1e-2),
    ("sgd", dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=True), 1e-2),
    ("adam", dict(eps_root=0.0), dict(), 0.0),
    ("adam", dict(eps_root=0.0), dict(), 1e-2),
    ("adam", dict(beta1=0.5, beta2=0.9, eps=1e-6, eps_root=0.0), dict(betas=(0.5, 0.9), eps=1e-6), 0.0),
    ("adamw", dict(eps_root=0.0, decoupled=True), dict(), 1e-1),
]


def _ours(kind, options):
    return mgd.SGD(**options) if kind == "sgd" else mgd.Adam(**options)


def _torch(kind, params, lr, wd, options):
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, lr=lr, weight_decay=wd, foreach=False, **options)


@pytest.mark.parametrize("kind,ours,theirs,wd", CASES)
def test_training_matches_torch_optim(digits, kind, ours, theirs, wd):
    dtype = torch.float64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    reference = copy.deepcopy(model)
    x = torch.as_tensor(digits.x_train[:400], dtype=dtype)
    y = torch.as_tensor(digits.y_train[:400])
    lr = 0.05 if kind == "sgd" else 3e-3
    trainer = mgd.Trainer(model, _ours(kind, ours), x, y, steps=STEPS, batch_size=50, lr=lr, weight_decay=wd)
    final = trainer.run()

    optimizer = _torch(kind, reference.parameters(), lr, wd, theirs)
    for t in range(STEPS):
        index = trainer.batch_indices(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x[index]), y[index]).backward()
        optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    moved = (expected - trainer.flat_params()).norm()
    assert moved > 1e-2  # the run really trained
    assert torch.allclose(final.params, expected, rtol=1e-10, atol=1e-12), (
        (final.params - expected).abs().max().item()
    )


def test_default_eps_root_barely_changes_the_forward_pass():
    """eps_root = 1e-16 moves Adam's trajectory by well under 1% of how far it travels."""
    torch.manual_seed(0)
    params = torch.randn(1000, dtype=torch.float64)
    grads = [torch.randn(1000, dtype=torch.float64) * 10.0 ** torch.randint(-6, 1, (1000,)) for _ in range(20)]
    a, b = mgd.Adam(eps_root=0.0), mgd.Adam()
    pa, sa, pb, sb = params, a.init(params), params, b.init(params)
    for t, g in enumerate(grads):
        pa, sa = a.update(g, pa, sa, step=t, lr=1e-3)
        pb, sb = b.update(g, pb, sb, step=t, lr=1e-3)
    travelled = (pa - params).norm()
    assert 0 < (pa - pb).norm() < 1e-2 * travelled


@pytest.mark.parametrize("bad", [dict(beta1=1.0), dict(beta2=-0.1), dict(eps=-1.0), dict(eps_root=-1e-9)])
def test_adam_rejects_bad_hyperparameters(bad):
    with pytest.raises(mgd.UserError):
        mgd.Adam(**bad)


def test_sgd_rejects_nesterov_without_momentum():
    with pytest.raises(mgd.UserError, match="Nesterov"):
        mgd.SGD(momentum=0.0, nesterov=True)


@pytest.mark.parametrize("make", [
    lambda: mgd.SGD(), lambda: mgd.SGD(momentum=0.9), lambda: mgd.SGD(momentum=0.9, nesterov=True),
    lambda: mgd.Adam(), lambda: mgd.Adam(decoupled=True), lambda: mgd.Adam(eps_root=0.0, beta1=0.5),
], ids=["sgd", "momentum", "nesterov", "adam", "adamw", "adam-eps_root0"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_closed_form_update_vjp_equals_autograd(make, weight_decay):
    """The reverse pass's closed-form optimizer adjoints against autograd over update()."""
    opt = make()
    g = torch.Generator().manual_seed(0)
    n = 50
    grad, params = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    state = tuple(torch.randn(n, generator=g, dtype=torch.float64).abs() for _ in opt.init(params))
    params_bar = torch.randn(n, generator=g, dtype=torch.float64)
    state_bar = tuple(torch.randn(n, generator=g, dtype=torch.float64) for _ in state)
    lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    wd = torch.tensor(weight_decay, dtype=torch.float64, requires_grad=True)
    leaves = [grad.clone().requires_grad_(), params.clone().requires_grad_(), *(s.clone().requires_grad_() for s in state)]
    new_params, new_state = opt.update(leaves[0], leaves[1], tuple(leaves[2:]), step=4, lr=lr, weight_decay=wd)
    expected = torch.autograd.grad((new_params, *new_state), (*leaves, lr, wd), (params_bar, *state_bar))
    closed = opt.update_vjp(grad, params, state, params_bar, state_bar, step=4, lr=lr, weight_decay=wd)
    got = (closed.grad, closed.params, *closed.state, closed.lr, closed.weight_decay)
    for name, a, b in zip(["grad", "params", *["state"] * len(state), "lr", "weight_decay"], got, expected):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
    # a Python-float weight decay of 0 skips the term, as update() does
    plain = opt.update_vjp(grad, params, state, params_bar, state_bar, step=4, lr=0.07, weight_decay=0.0)
    if weight_decay == 0.0:
        assert torch.allclose(plain.params, closed.params, rtol=1e-12)


IN_PLACE_CASES = [
    mgd.SGD(), mgd.SGD(momentum=0.9), mgd.SGD(momentum=0.9, nesterov=True),
    mgd.Adam(), mgd.Adam(decoupled=True), mgd.Adam(eps_root=0.0), mgd.Adam(decoupled=True, eps_root=1e-8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt", IN_PLACE_CASES, ids=lambda o: repr(o))
def test_update_without_a_graph_gives_the_graphs_bits_in_fresh_or_donated_tensors(opt, dtype):
    """With no graph to record, updates write their temporaries in place; the result must be the
    recorded expression's, bit for bit, and share no storage with the inputs (checkpoints)."""
    gen = torch.Generator().manual_seed(0)
    grad, params = torch.randn(500, generator=gen, dtype=dtype), torch.randn(500, generator=gen, dtype=dtype)
    state = tuple(torch.rand(500, generator=gen, dtype=dtype) for _ in opt.init(params))
    for lr in (0.1, torch.tensor(0.1, dtype=dtype)):
        for weight_decay in (0.0, 0.01, torch.tensor(0.01, dtype=dtype)):
            with torch.no_grad():
                fast = opt.update(grad, params, state, step=3, lr=lr, weight_decay=weight_decay)
            with torch.enable_grad():
                graph = opt.update(grad, params.clone().requires_grad_(True), state, step=3, lr=lr,
                                   weight_decay=weight_decay)
            for a, b in zip((fast[0], *fast[1]), (graph[0], *graph[1])):
                assert torch.equal(a, b.detach())
                assert all(a.data_ptr() != t.data_ptr() for t in (grad, params, *state))
            # donated: the same bits, written into the given tensors
            given = (params.clone(), tuple(t.clone() for t in state))
            with torch.no_grad():
                donated = opt.update_in_place(grad, *given, step=3, lr=lr, weight_decay=weight_decay)
            for a, b, into in zip((donated[0], *donated[1]), (fast[0], *fast[1]), (given[0], *given[1])):
                assert torch.equal(a, b) and a.data_ptr() == into.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt", [o for o in IN_PLACE_CASES if isinstance(o, mgd.Adam)], ids=lambda o: repr(o))
def test_adam_update_vjp_without_a_graph_gives_the_graphs_bits(opt, dtype):
    """With no graph to record, Adam's closed-form VJP reuses a few buffers; the result must be
    the recorded expression's bit for bit, and its inputs must be left as they were."""
    gen = torch.Generator().manual_seed(1)
    n = 400
    grad, params, params_bar = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(3))
    state = (torch.randn(n, generator=gen, dtype=dtype), torch.rand(n, generator=gen, dtype=dtype))
    state_bar = (torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype))
    inputs = [t.clone() for t in (grad, params, params_bar, *state, *state_bar)]
    for lr in (0.1, torch.tensor(0.1, dtype=dtype)):
        for weight_decay in (0.0, 0.01, torch.tensor(0.01, dtype=dtype)):
            kwargs = dict(step=3, lr=lr, weight_decay=weight_decay)
            fast = opt.update_vjp(grad, params, state, params_bar, state_bar, **kwargs)
            with torch.enable_grad():
                graph = opt.update_vjp(grad, params.clone().requires_grad_(True), state, params_bar, state_bar,
                                       **kwargs)
            for a, b in zip((fast.grad, fast.params, *fast.state, fast.lr, fast.weight_decay),
                            (graph.grad, graph.params, *graph.state, graph.lr, graph.weight_decay)):
                assert torch.equal(a, b.detach())
            assert all(torch.equal(a, b) for a, b in zip((grad, params, params_bar, *state, *state_bar), inputs))
