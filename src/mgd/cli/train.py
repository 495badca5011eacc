"""``mgd train``: train once and write ``OUT/result.json``."""

from __future__ import annotations

import argparse
import time

from mgd import __version__
from mgd._resources import peak_memory
from mgd.cli.common import (
    add_distributed_flags,
    add_output_flags,
    add_run_flags,
    configure_torch,
    progress_bars,
    track_given_flags,
)
from mgd.cli.task import add_task_flag, subject_from_args
from mgd.io import write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train once and report losses and accuracies",
        description="Train once and write OUT/result.json (val/test loss and accuracy, the "
        "resolved config; with --task: the task's validation objective and metrics and the "
        "run's description). The same flags give the same run in any process.",
    )
    track_given_flags(parser)
    add_task_flag(parser)
    add_run_flags(parser)
    add_output_flags(parser, "runs/train")
    add_distributed_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    subject = subject_from_args(args, command="mgd train")
    collective = subject.collective
    with progress_bars({"train": subject.run.steps}, enabled=not args.quiet and collective.is_main) as progress:
        callback = (lambda state: progress("train", 1)) if progress else None
        started = time.perf_counter()
        with peak_memory() as memory:
            final = subject.run.run(subject.meta, callback=callback)
        seconds = time.perf_counter() - started
    metrics = subject.evaluate(final)
    result = {
        **metrics,
        **subject.record,
        "threads": args.threads,
        "train_seconds": seconds,
        "peak_memory_mb": memory.extra_mb,
        "mgd_version": __version__,
    }
    if not collective.is_main:
        return 0
    write_json(f"{args.out}/result.json", result)
    if not args.quiet:
        print(
            f"trained {subject.label} for {subject.run.steps} steps in {seconds:.2f}s: "
            f"{subject.headline_text(metrics)}"
        )
        print(f"wrote {args.out}/result.json")
    return 0
