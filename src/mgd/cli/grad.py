"""``mgd grad``: the exact metagradient of the validation loss; writes result.json and metagrad.npz."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mgd import __version__
from mgd._resources import peak_memory
from mgd.cli.common import (
    add_output_flags,
    add_distributed_flags,
    add_plan_flags,
    add_run_flags,
    configure_torch,
    meta_files,
    progress_bars,
    track_given_flags,
)
from mgd.cli.task import add_task_flag, meta_names, subject_from_args
from mgd.config import CLI_METAPARAMS
from mgd.errors import UserError
from mgd.io import write_json, write_npz
from mgd.replay import MODES, metagradient
from mgd.resumable import ResumableRun


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "grad",
        help="compute the exact metagradient of the validation loss",
        description="Train, then run the REPLAY reverse pass: writes OUT/result.json (val loss, "
        "timing, peak memory, replay plan; with --task: the task's validation objective and "
        "metrics) and OUT/metagrad.npz (one array per metaparameter).",
    )
    track_given_flags(parser)
    add_task_flag(parser)
    add_run_flags(parser)
    r = parser.add_argument_group("metagradient")
    r.add_argument("--meta", default="lr,data_weights",
                   help=f"comma-separated metaparameters to differentiate, from {', '.join(CLI_METAPARAMS)} "
                        "(default: %(default)s; with --task: kinds of the task's run, default all of them)")
    r.add_argument("--mode", choices=MODES, default="replay",
                   help="replay: lazy k-ary checkpoint tree; unrolled: store every state (default: %(default)s)")
    add_plan_flags(r)
    add_output_flags(parser, "runs/grad")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the killed pass in DIR (started with --out DIR and the same flags); "
                             "the result equals an uninterrupted pass bit for bit")
    add_distributed_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    subject = subject_from_args(args, command="mgd grad")
    wrt = meta_names(args, subject.run)
    out, saved = Path(args.resume or args.out), None
    if subject.collective.world_size == 1:  # one process: the pass saves its progress in OUT/pass
        config = {"subject": subject.record, "meta": wrt, "mode": args.mode, "replay_k": args.replay_k,
                  "vjp": args.vjp, "memory_budget": args.memory_budget, "host_budget": args.host_budget,
                  "disk_budget": args.disk_budget, "threads": args.threads, "meta_files": meta_files(args)}
        saved = ResumableRun.open(out, command="grad", config=config, resume=bool(args.resume))
        if saved.finished:
            if not args.quiet:
                print(f"{out} is finished: nothing to resume ({out}/result.json)")
            return 0
    try:
        return _compute(args, subject, wrt, out, saved)
    except UserError:
        if saved is not None and not args.resume:
            saved.discard_unstarted()
        raise


def _compute(args: argparse.Namespace, subject, wrt: list[str], out: Path, saved: ResumableRun | None) -> int:
    collective = subject.collective
    steps = subject.run.steps
    # Under torchrun every rank computes; only rank 0 shows progress and writes outputs.
    with progress_bars({"forward": steps, "reverse": steps}, enabled=not args.quiet and collective.is_main) as progress:
        started = time.perf_counter()
        with peak_memory() as memory:
            result = metagradient(
                subject.run, subject.objective, subject.meta, wrt=wrt, mode=args.mode,
                k=args.replay_k, memory_budget=args.memory_budget, host_budget=args.host_budget,
                disk_budget=args.disk_budget, checkpoint_dir=args.checkpoint_dir,
                keep_checkpoints=args.keep_checkpoints, state_dir=None if saved is None else saved.state_dir,
                vjp=args.vjp, progress=progress,
            )
        seconds = time.perf_counter() - started
    grads = {name: g.detach().cpu().double().numpy() for name, g in result.grads.items()}
    summary = {
        **subject.evaluate(result.final_state, result.value),
        "metagrad_norms": {name: float(np.linalg.norm(g)) for name, g in grads.items()},
        "mode": args.mode,
        "plan": {**result.plan.to_dict(), "vjp": args.vjp, **result.memory,
                 "planned_memory_mb": result.memory["planned_peak_bytes"] / 2**20},
        "timing": {**result.timings, "total_s": seconds},
        "peak_memory_mb": memory.extra_mb,
        **subject.record,
        "threads": args.threads,
        "meta": wrt,
        "meta_files": meta_files(args),
        "mgd_version": __version__,
    }
    if not collective.is_main:
        return 0
    write_npz(out / "metagrad.npz", grads)
    write_json(out / "result.json", summary)
    if saved is not None:
        saved.complete()
    if not args.quiet:
        print(describe(summary, grads))
        print(f"wrote {out}/result.json and {out}/metagrad.npz")
    return 0


def describe(summary: dict, grads: dict[str, np.ndarray]) -> str:
    """A short human summary of a metagradient."""
    plan = summary["plan"]
    if "val_loss" in summary:
        head = f"val loss {summary['val_loss']:.4f} (val acc {summary['val_accuracy']:.4f})"
    else:  # a task
        head = f"val objective {summary['val_objective']:.4f}"
    lines = [
        f"{head} after "
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
