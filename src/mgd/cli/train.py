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
    collective_from_args,
    config_from_args,
    configure_torch,
    meta_files,
    progress_bars,
)
from mgd.config import build_problem
from mgd.io import write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train once and report losses and accuracies",
        description="Train once and write OUT/result.json (val/test loss and accuracy, the "
        "resolved config). The same flags give the same run in any process.",
    )
    add_run_flags(parser)
    add_output_flags(parser, "runs/train")
    add_distributed_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    config = config_from_args(args)
    collective = collective_from_args(args)
    problem = build_problem(config, collective=collective)
    meta = problem.load_meta_files(meta_files(args))
    with progress_bars({"train": config.steps}, enabled=not args.quiet and collective.is_main) as progress:
        callback = (lambda state: progress("train", 1)) if progress else None
        started = time.perf_counter()
        with peak_memory() as memory:
            final = problem.trainer.run(meta, callback=callback)
        seconds = time.perf_counter() - started
    metrics = problem.evaluate(final)
    result = {
        **metrics,
        "config": config.to_dict(),
        "threads": args.threads,
        "distributed": collective.describe(),
        "dataset": problem.dataset.summary(),
        "num_params": problem.trainer.num_params,
        "train_seconds": seconds,
        "peak_memory_mb": memory.extra_mb,
        "mgd_version": __version__,
    }
    if not collective.is_main:
        return 0
    write_json(f"{args.out}/result.json", result)
    if not args.quiet:
        print(
            f"trained {config.model} on {problem.dataset.name} for {config.steps} steps "
            f"in {seconds:.2f}s: val loss {metrics['val_loss']:.4f}, "
            f"val acc {metrics['val_accuracy']:.4f}, test acc {metrics['test_accuracy']:.4f}"
        )
        print(f"wrote {args.out}/result.json")
    return 0
