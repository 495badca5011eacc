#!/usr/bin/env python
"""bench_distributed: strong scaling of one metagradient over data-parallel processes.

The problem is the one of ``bench_grad.py`` (digits, the 64-128-128-10 tanh MLP, batches of
100, SGD with momentum 0.9 and lr 0.05, metaparameters ``lr`` and ``data_weights``) at
horizon ``--steps``. Each configuration is one ``mgd grad`` command, timed by ``mgd`` itself
(``result.json``'s ``timing.total_s``: forward pass plus reverse pass, no start-up):

* ``1 process x 1 thread``: the baseline;
* ``1 process x W threads``: the same cores used by intra-op threads instead;
* ``W processes x 1 thread``: ``torchrun --standalone --nproc-per-node W -m mgd grad``
  (gloo on loopback), each rank computing half of every minibatch.

It prints seconds, speed-up over the baseline and the relative difference of the
metagradients from the baseline (float32; the tests check 1e-10 in float64).

Usage::

    python benchmarks/bench_distributed.py --steps 1000 --world 2 --repeats 3
    python benchmarks/bench_distributed.py --steps 100 --repeats 1 \
        --problem "--dataset mnist1d --width 1000 --batch-size 1000 --meta lr,data_weights --quiet"

Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBLEM = ["--dataset", "digits", "--meta", "lr,data_weights", "--quiet"]


def run_grad(steps: int, processes: int, threads: int, out: Path, problem: list[str]) -> dict:
    """One ``mgd grad`` run; returns its result.json and metagradients."""
    flags = [*problem, "--steps", str(steps), "--threads", str(threads), "--out", str(out)]
    if processes == 1:
        argv = [sys.executable, "-m", "mgd", "grad", *flags]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(processes), "-m", "mgd", "grad", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    with np.load(out / "metagrad.npz", allow_pickle=False) as grads:
        result["grads"] = {name: grads[name] for name in grads.files}
    return result


def relative_difference(a: dict, b: dict) -> float:
    return max(float(np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n])) for n in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--world", type=int, default=2, help="processes (and threads) to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problem", default=" ".join(PROBLEM),
                        help="mgd grad flags of the problem (default: %(default)r)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    problem = args.problem.split()
    configs = [("1 process x 1 thread", 1, 1), (f"1 process x {args.world} threads", 1, args.world),
               (f"{args.world} processes x 1 thread", args.world, 1)]
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    grads: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, processes, threads in configs:
                result = run_grad(args.steps, processes, threads, Path(tmp) / f"{repeat}-{processes}-{threads}", problem)
                seconds[label].append(result["timing"]["total_s"])
                grads[label] = result["grads"]
                print(f"[{repeat + 1}/{args.repeats}] {label}: {seconds[label][-1]:.2f} s", file=sys.stderr)
    base_label = configs[0][0]
    base = statistics.median(seconds[base_label])
    rows = []
    for label, _, _ in configs:
        median = statistics.median(seconds[label])
        rows.append({"config": label, "seconds": median, "speedup": base / median,
                     "rel_diff_vs_one_process": relative_difference(grads[label], grads[base_label])})
    print(f"{args.problem} --steps {args.steps}: median of {args.repeats}, float32")
    print("| configuration | metagradient s | speed-up | max rel. diff. vs 1 process |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['seconds']:.2f} | {row['speedup']:.2f}x | {row['rel_diff_vs_one_process']:.1e} |")
    if args.out:
        summary = {"problem": args.problem, "steps": args.steps, "repeats": args.repeats, "rows": rows}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
