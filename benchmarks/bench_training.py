#!/usr/bin/env python
"""bench_training: ``mgd``'s own training against a plain ``torch.optim`` loop on the same batches.

The problem is ``bench_grad.py``'s: the digits MLP (64-128-128-10, tanh), batch 100, the
metaparameters ``lr`` and ``data_weights`` declared (at their neutral all-ones values), SGD
with momentum 0.9 (lr 0.05) or Adam (lr 1e-3), T steps. ``mgd``: ``run.run()``; the loop:
``bench_grad._torch_optim_training`` (an ``nn.Module`` copy, ``torch.optim.SGD``/``Adam``,
the same minibatch indices, the batch-mean cross-entropy). One torch thread, CPU time of
this thread (``time.thread_time``), ``--repeats`` interleaved pairs after a warm-up; it
prints the median of the per-pair ratios (robust to a machine whose speed drifts) and the
ratio of the fastest runs.

    python benchmarks/bench_training.py --steps 1000 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import bench_grad  # noqa: E402


def thread_seconds(fn, *args) -> float:
    started = time.thread_time()
    fn(*args)
    return time.thread_time() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--optimizers", default="sgd,adam")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = bench_grad._load_data(torch.float32, "cpu")
    print("| optimizer | T | mgd (s, fastest) | torch.optim (s, fastest) | median of paired ratios | "
          "ratio of the fastest |\n|---|---|---|---|---|---|")
    for optimizer in args.optimizers.split(","):
        run, _ = bench_grad._build_problem(data, optimizer, args.steps)
        run.run()
        bench_grad._torch_optim_training(run, optimizer)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(thread_seconds(run.run))
            theirs.append(thread_seconds(bench_grad._torch_optim_training, run, optimizer))
        paired = statistics.median(a / b for a, b in zip(ours, theirs))
        print(f"| {optimizer} | {args.steps} | {min(ours):.3f} | {min(theirs):.3f} | {paired:.3f}x | "
              f"{min(ours) / min(theirs):.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
