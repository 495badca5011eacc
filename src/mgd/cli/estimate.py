"""``mgd estimate``: print the replay plan and its memory for a configuration, without training."""

from __future__ import annotations

import argparse
import json

from mgd.cli.common import add_replay_k_flag, add_run_flags, config_from_args, configure_torch
from mgd.config import build_problem
from mgd.replay import ReplayPlan


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "estimate",
        help="print the replay plan (k, depth, checkpoints, extra passes, memory) without running",
        description="Dry run: count what `mgd grad` would store and replay for this configuration.",
    )
    add_run_flags(parser)
    add_replay_k_flag(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    config = config_from_args(args)
    problem = build_problem(config)  # builds the model to count parameters; trains nothing
    state_bytes = problem.trainer.init_state().nbytes()
    rows = {
        "replay": ReplayPlan.build(config.steps, args.replay_k),
        "unrolled": ReplayPlan.build(config.steps, config.steps),
    }
    report = {
        "num_params": problem.trainer.num_params,
        "state_bytes": state_bytes,
        **{
            mode: {**plan.to_dict(), "checkpoint_memory_mb": plan.memory_bytes(state_bytes) / 2**20}
            for mode, plan in rows.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{config.model} on {problem.dataset.name}: {report['num_params']:,} parameters, "
        f"{config.optimizer} state {state_bytes / 2**20:.2f} MB ({config.dtype}), T={config.steps}"
    )
    print(f"{'mode':<10}{'k':>7}{'depth':>7}{'checkpoints':>13}{'replayed steps':>16}{'extra passes':>14}{'memory MB':>11}")
    for mode, plan in rows.items():
        memory = report[mode]["checkpoint_memory_mb"]
        print(
            f"{mode:<10}{plan.k:>7}{plan.depth:>7}{plan.max_live_checkpoints:>13}"
            f"{plan.replayed_steps:>16}{plan.extra_passes:>14.2f}{memory:>11.1f}"
        )
    print("memory = (checkpoints + adjoint + final state) x state size; activations of one step come on top")
    return 0
