"""Memory planning: the plan's accounting, the budget policy and the engine keeping to it."""

from __future__ import annotations

import pytest
import torch

import mgd
from mgd.errors import UserError
from mgd.memory import parse_memory_size, step_graph_bytes
from mgd.replay import ReplayPlan, ReplayTrace, default_k

from conftest import tiny_problem


@pytest.mark.parametrize("T,k", [(8, 2), (13, 3), (20, 5), (30, 6), (17, 17)])
def test_plan_frontier_bounds_what_the_engine_keeps(digits, T, k):
    trainer, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=T)
    trace = ReplayTrace()
    mgd.metagradient(trainer, objective, k=k, trace=trace)
    plan = ReplayPlan.build(T, k, fused=True)
    kept = set(zip(trace.live_checkpoints, trace.live_graphs))
    assert max(g for _, g in kept) == plan.max_live_graphs
    assert max(c for c, _ in kept) == plan.max_live_checkpoints
    for c, g in kept:  # every moment is dominated by a frontier point
        assert any(fc >= c and fg >= g for fc, fg in plan.frontier), (c, g)
    if k < T:
        assert plan.max_live_graphs > 0  # leaves kept their graphs


def test_budget_policy():
    T, S, G = 3000, 200_000, 500_000
    lean = ReplayPlan.choose(T, S, G)
    assert lean.depth == 2 and lean.fused
    # the lean plan is the two-level tree with the least memory: better than the default k
    assert lean.peak_bytes(S, G) <= ReplayPlan.build(T, default_k(T), fused=True).peak_bytes(S, G)
    everything = ReplayPlan.choose(T, S, G, budget=10**9)
    assert everything.k == T and everything.replayed_steps == 0
    assert ReplayPlan.choose(T, S, G, budget=lean.peak_bytes(S, G)).k == lean.k
    for budget in (30 * 2**20, 20 * 2**20, 8 * 2**20, 3 * 2**20):
        plan = ReplayPlan.choose(T, S, G, budget=budget)
        assert plan.peak_bytes(S, G) <= budget
        assert plan.depth >= 2
    deeper = ReplayPlan.choose(T, S, G, budget=8 * 2**20)
    assert deeper.depth > 2 and deeper.replayed_steps > lean.replayed_steps
    with pytest.raises(UserError, match="memory budget .* too small.*raise --memory-budget"):
        ReplayPlan.choose(T, S, G, budget=10 * S)
    # a cap (the available RAM) turns the lean default into a budget
    assert ReplayPlan.choose(T, S, G, cap=8 * 2**20).peak_bytes(S, G) <= 8 * 2**20


def test_engine_keeps_to_a_budget_and_stays_bit_identical(digits):
    T = 40
    trainer, objective = tiny_problem(digits, mgd.Adam(), steps=T, lr=0.01)
    reference = mgd.metagradient(trainer, objective, mode="unrolled")
    state_bytes = reference.memory["state_bytes"]
    lean = mgd.metagradient(trainer, objective)
    graph_bytes = lean.memory["graph_bytes"]
    assert graph_bytes > 0 and lean.plan.depth == 2
    for budget in (10**10, lean.memory["planned_peak_bytes"], 9 * state_bytes):
        trace = ReplayTrace()
        result = mgd.metagradient(trainer, objective, memory_budget=budget, trace=trace)
        assert result.memory["planned_peak_bytes"] <= budget
        held = max(c * state_bytes + g * graph_bytes for c, g in zip(trace.live_checkpoints, trace.live_graphs))
        assert held + 2 * state_bytes <= budget
        for name in reference.grads:
            assert torch.equal(result.grads[name], reference.grads[name]), (budget, name)
    assert mgd.metagradient(trainer, objective, memory_budget=10**10).plan.k == T


def test_step_graph_bytes_counts_what_autograd_saves(digits):
    trainer, _ = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=3)
    state = trainer.init_state()
    local = trainer.local_meta(trainer.default_meta(), 0)
    sgd = step_graph_bytes(trainer, state, local, list(local))
    # at least the activations of the batch through the first layer, at most a few hundred copies
    assert 4 * trainer.batch_size * 8 < sgd < 200 * state.nbytes()
    trainer, _ = tiny_problem(digits, mgd.Adam(), steps=3)
    state = trainer.init_state()
    # the update is re-run at the VJP, not kept: Adam's graph costs what SGD's does
    assert step_graph_bytes(trainer, state, local, list(local)) == sgd


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("2GiB", 2 * 2**30), ("1000", 1000), ("64 kb", 64 * 1024),
])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5XB", "-1GB", "0"])
def test_bad_memory_size_is_a_user_error(text):
    with pytest.raises(UserError, match="memory size"):
        parse_memory_size(text)


@pytest.mark.parametrize("T", [2, 5, 13, 40, 257, 3000])
@pytest.mark.parametrize("graph_over_state", [0.0, 0.5, 1.3, 4.0])
def test_tapered_root_partitions_the_run_and_levels_the_peak(T, graph_over_state):
    from mgd.replay import VJP, schedule, tapered_root

    S, G = 1000, int(1000 * graph_over_state)
    root = tapered_root(T, S, G)
    lengths = [b - a for a, b in zip(root, root[1:])]
    assert root[0] == 0 and root[-1] == T and min(lengths) >= 1
    assert lengths == sorted(lengths, reverse=True)  # shorter towards the end
    vjps = [op.step for op in schedule(T, 2, root) if isinstance(op, VJP)]
    assert vjps == list(range(T - 1, -1, -1))
    tapered = ReplayPlan.build(T, fused=G > 0, root=root)
    # one replay, nothing replayed twice (a fused leaf also linearizes its last step)
    # (one-step segments need no replay: their VJP recomputes the step)
    assert tapered.replayed_steps == (sum(n for n in lengths if n > 1) if G > 0 else T - len(lengths))
    if T >= 40:  # below the equal-segment two-level tree with the same single replay
        uniform = min(ReplayPlan.build(T, k, fused=G > 0).peak_bytes(S, G) for k in range(default_k(T), T, 7))
        assert tapered.peak_bytes(S, G) < uniform


def test_tapered_plans_are_exact_and_kept_to(digits):
    T = 37
    trainer, objective = tiny_problem(digits, mgd.Adam(), steps=T, lr=0.01)
    reference = mgd.metagradient(trainer, objective, mode="unrolled")
    trace = ReplayTrace()
    lean = mgd.metagradient(trainer, objective, trace=trace)
    assert lean.plan.root is not None and lean.plan.depth == 2
    for name in reference.grads:
        assert torch.equal(lean.grads[name], reference.grads[name]), name
    kept = set(zip(trace.live_checkpoints, trace.live_graphs))
    for c, g in kept:
        assert any(fc >= c and fg >= g for fc, fg in lean.plan.frontier), (c, g)
