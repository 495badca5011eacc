"""``mgd grad``: the exact metagradient of the validation loss; writes result.json and metagrad.npz."""

from __future__ import annotations

import argparse
import time

import numpy as np

from mgd import __version__
from mgd._resources import peak_memory
from mgd.cli.common import (
    add_output_flags,
    add_distributed_flags,
    add_plan_flags,
    add_run_flags,
    collective_from_args,
    config_from_args,
    configure_torch,
    meta_files,
    progress_bars,
)
from mgd.config import CLI_METAPARAMS, build_problem
from mgd.errors import check_choices
from mgd.io import write_json, write_npz
from mgd.replay import MODES, metagradient


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "grad",
        help="compute the exact metagradient of the validation loss",
        description="Train, then run the REPLAY reverse pass: writes OUT/result.json (val loss, "
        "timing, peak memory, replay plan) and OUT/metagrad.npz (one array per metaparameter).",
    )
    add_run_flags(parser)
    r = parser.add_argument_group("metagradient")
    r.add_argument("--meta", default="lr,data_weights",
                   help=f"comma-separated metaparameters to differentiate, from {', '.join(CLI_METAPARAMS)} "
                        "(default: %(default)s)")
    r.add_argument("--mode", choices=MODES, default="replay",
                   help="replay: lazy k-ary checkpoint tree; unrolled: store every state (default: %(default)s)")
    add_plan_flags(r)
    add_output_flags(parser, "runs/grad")
    add_distributed_flags(parser)
    parser.set_defaults(run=run)


def parse_meta(text: str) -> list[str]:
    return check_choices(text.split(","), CLI_METAPARAMS, "--meta")


def run(args: argparse.Namespace) -> int:
    wrt = parse_meta(args.meta)
    configure_torch(args)
    config = config_from_args(args)
    collective = collective_from_args(args)
    problem = build_problem(config, collective=collective)
    meta = problem.load_meta_files(meta_files(args))
    totals = {"forward": config.steps, "reverse": config.steps}
    # Under torchrun every rank computes; only rank 0 shows progress and writes outputs.
    with progress_bars(totals, enabled=not args.quiet and collective.is_main) as progress:
        started = time.perf_counter()
        with peak_memory() as memory:
            result = metagradient(
                problem.trainer, problem.val_objective(), meta, wrt=wrt, mode=args.mode,
                k=args.replay_k, memory_budget=args.memory_budget, vjp=args.vjp, progress=progress,
            )
        seconds = time.perf_counter() - started
    metrics = problem.evaluate(result.final_state)
    grads = {name: g.detach().cpu().double().numpy() for name, g in result.grads.items()}
    summary = {
        "val_loss": result.value,
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "metagrad_norms": {name: float(np.linalg.norm(g)) for name, g in grads.items()},
        "mode": args.mode,
        "plan": {**result.plan.to_dict(), "vjp": args.vjp, **result.memory,
                 "planned_memory_mb": result.memory["planned_peak_bytes"] / 2**20},
        "timing": {**result.timings, "total_s": seconds},
        "peak_memory_mb": memory.extra_mb,
        "config": config.to_dict(),
        "threads": args.threads,
        "distributed": collective.describe(),
        "meta": wrt,
        "meta_files": meta_files(args),
        "dataset": problem.dataset.summary(),
        "num_params": problem.trainer.num_params,
        "mgd_version": __version__,
    }
    if not collective.is_main:
        return 0
    write_npz(f"{args.out}/metagrad.npz", grads)
    write_json(f"{args.out}/result.json", summary)
    if not args.quiet:
        print(describe(summary, grads))
        print(f"wrote {args.out}/result.json and {args.out}/metagrad.npz")
    return 0


def describe(summary: dict, grads: dict[str, np.ndarray]) -> str:
    """A short human summary of a metagradient."""
    plan = summary["plan"]
    lines = [
        f"val loss {summary['val_loss']:.4f} (val acc {summary['val_accuracy']:.4f}) after "
        f"{plan['steps']} steps; metagradient in {summary['timing']['total_s']:.2f}s, "
        f"k={plan['k']}, {plan['max_live_checkpoints']} checkpoints, "
        f"{plan['max_live_graphs']} kept step graphs, {plan['extra_passes']:.2f} extra passes, "
        f"planned memory {plan['planned_memory_mb']:.1f} MB",
    ]
    if "data_weights" in grads:
        g = grads["data_weights"]
        harmful = np.argsort(-g)[:5]
        helpful = np.argsort(g)[:5]
        lines.append(
            "data_weights: upweighting raises val loss most for examples "
            + ", ".join(f"{i} ({g[i]:+.2e})" for i in harmful)
        )
        lines.append(
            "              and lowers it most for examples "
            + ", ".join(f"{i} ({g[i]:+.2e})" for i in helpful)
        )
    if "lr" in grads:
        g = grads["lr"]
        quarter = max(1, len(g) // 4)
        lines.append(
            f"lr: dL/d(multiplier) summed over the first quarter {g[:quarter].sum():+.3e}, "
            f"last quarter {g[-quarter:].sum():+.3e} (negative: a larger LR there lowers val loss)"
        )
    for name in ("lr_knots", "weight_decay"):
        if name in grads:
            values = np.atleast_1d(grads[name])
            lines.append(f"{name}: " + " ".join(f"{v:+.3e}" for v in values))
    return "\n".join(lines)
