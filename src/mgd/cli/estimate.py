"""``mgd estimate``: the reverse pass's plan and memory for a configuration, without training."""

from __future__ import annotations

import argparse
import json

from mgd.cli.common import add_plan_flags, add_run_flags, config_from_args, configure_torch
from mgd.config import build_problem
from mgd.memory import default_memory_budget, step_graph_bytes
from mgd.replay import ReplayPlan, make_plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "estimate",
        help="print the replay plan (k, depth, checkpoints, kept graphs, extra passes, memory) without running",
        description="Dry run: what `mgd grad` would store and replay for this configuration and "
        "these plan flags, next to the lean default and storing every state. Runs one step with "
        "a graph to measure what a kept step graph costs; trains nothing.",
    )
    add_run_flags(parser)
    add_plan_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    config = config_from_args(args)
    problem = build_problem(config)  # builds the model to count parameters; trains nothing
    trainer = problem.trainer
    state = trainer.init_state()
    state_bytes = state.nbytes()
    fused = args.vjp == "fused"
    wrt = list(trainer.metaparams)
    graph_bytes = step_graph_bytes(trainer, state, trainer.local_meta(trainer.default_meta(), 0), wrt)
    cap = default_memory_budget()
    T = config.steps
    chosen = make_plan(T, state_bytes, graph_bytes if fused and args.replay_k is None else 0, k=args.replay_k,
                       fused=fused, memory_budget=args.memory_budget, host_budget=args.host_budget,
                       disk_budget=args.disk_budget)
    rows = {
        "plan": chosen,
        "lean": ReplayPlan.choose(T, state_bytes, graph_bytes, fused=True, cap=cap),
        "store all": ReplayPlan.build(T, T),
    }

    def memory_mb(plan: ReplayPlan) -> float:
        return plan.peak_bytes(state_bytes, graph_bytes if plan.fused else 0) / 2**20

    report = {
        "num_params": trainer.num_params,
        "state_bytes": state_bytes,
        "graph_bytes": graph_bytes,
        "memory_budget_bytes": args.memory_budget,
        "available_ram_cap_bytes": cap,
        "vjp": args.vjp,
        **{name: {**plan.to_dict(), "memory_mb": memory_mb(plan),
                  "tier_bytes": plan.tier_bytes(state_bytes, graph_bytes if plan.fused else 0)}
           for name, plan in rows.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{config.model} on {problem.dataset.name}: {report['num_params']:,} parameters, "
        f"{config.optimizer} state {state_bytes / 2**20:.2f} MB, one kept step graph "
        f"{graph_bytes / 2**20:.2f} MB ({config.dtype}), T={T}"
    )
    print(f"{'':<10}{'k':>7}{'depth':>7}{'checkpoints':>13}{'graphs':>8}{'replayed steps':>16}"
          f"{'extra passes':>14}{'memory MB':>11}")
    for name, plan in rows.items():
        print(
            f"{name:<10}{plan.k:>7}{plan.depth:>7}{plan.max_live_checkpoints:>13}{plan.max_live_graphs:>8}"
            f"{plan.replayed_steps:>16}{plan.extra_passes:>14.2f}{memory_mb(plan):>11.1f}"
        )
    tiers = rows["plan"].tier_bytes(state_bytes, graph_bytes if rows["plan"].fused else 0)
    if rows["plan"].placement:
        print(f"plan's checkpoints by tier: device {tiers['device'] / 2**20:.1f} MB at the peak, host "
              f"{tiers['host'] / 2**20:.1f} MB, disk {tiers['disk'] / 2**20:.1f} MB (written once and read "
              f"once: {2 * tiers['disk'] / 2**20:.1f} MB of I/O)")
    print("memory = device peak of (checkpoints x state + kept graphs x graph) + adjoint + final state; "
          "the working set of one step comes on top")
    return 0
