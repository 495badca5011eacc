#!/usr/bin/env python
"""scale_demo: one exact metagradient through 10,000 steps of a 1M-parameter model on 2 cores.

The run (issue 5's scale demonstration) is the ordinary CLI::

    mgd grad --dataset mnist1d --width 1000 --depth 2 --steps 10000 --batch-size 100 \\
        --meta lr,data_weights --memory-budget 1GB --threads 2

an MLP 40-1000-1000-10 (1,052,010 parameters) trained with SGD (momentum 0.9) on mnist1d
(4,000 training examples), differentiated with respect to every per-step learning-rate
multiplier (10,000) and every data weight (4,000). The script runs it in a child process
and reports

* wall time, and the child's peak resident memory (``wait4``'s ``ru_maxrss``: the whole
  process, Python, torch and data included);
* what ``mgd`` planned (``result.json``: k, depth, checkpoints, kept graphs, extra passes);
* what an unrolled peer would need: the full unroll (``mgd.check.full_unroll_metagradient``,
  which stores the whole graph as higher and TorchOpt do) is measured in child processes at
  two short horizons on the same model; its peak memory grows linearly in T, and the slope
  times 10,000 is the memory the unrolled method would need for this run.

Usage::

    python benchmarks/scale_demo.py --out scale.json          # about 10 minutes on 2 cores
    python benchmarks/scale_demo.py --steps 300 --budget 200MB  # a quick check

Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_FLAGS = ["--dataset", "mnist1d", "--width", "1000", "--depth", "2", "--batch-size", "100"]
PROBE_STEPS = (10, 30)


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` as a child and return (wall seconds, its own peak RSS in MB, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}):\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read()


PROBE = r"""
import json, sys, torch
torch.set_num_threads(2)
from mgd.config import RunConfig, build_problem
from mgd.check import full_unroll_metagradient
from mgd._resources import peak_memory
steps = int(sys.argv[1])
config = RunConfig(dataset="mnist1d", width=1000, depth=2, batch_size=100, steps=steps)
problem = build_problem(config)
wrt = ["lr", "data_weights"]
full_unroll_metagradient(problem.trainer, problem.val_objective(), wrt=wrt)  # warm-up at this T
with peak_memory() as memory:
    full_unroll_metagradient(problem.trainer, problem.val_objective(), wrt=wrt)
print(json.dumps({"steps": steps, "extra_mb": memory.extra_mb}))
"""


def unrolled_slope() -> dict:
    """Peak extra memory of the full unroll at two short horizons, and its slope per step."""
    points = []
    for steps in PROBE_STEPS:
        _, _, out = run_measured([sys.executable, "-c", PROBE, str(steps)])
        points.append(json.loads(out.strip().splitlines()[-1]))
    (t0, m0), (t1, m1) = ((p["steps"], p["extra_mb"]) for p in points)
    return {"points": points, "mb_per_step": (m1 - m0) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--budget", default="1GB", help="mgd grad --memory-budget (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "mgd", "grad", *MODEL_FLAGS, "--steps", str(args.steps),
            "--meta", "lr,data_weights", "--memory-budget", args.budget,
            "--threads", str(args.threads), "--out", f"{tmp}/grad", "--quiet",
        ]
        print("running:", " ".join(argv[1:]), flush=True)
        seconds, peak_mb, _ = run_measured(argv)
        result = json.loads(Path(f"{tmp}/grad/result.json").read_text())
    slope = unrolled_slope()
    summary = {
        "command": " ".join(argv[1:-3]),
        "num_params": result["num_params"],
        "steps": args.steps,
        "wall_s": seconds,
        "metagradient_s": result["timing"]["total_s"],
        "forward_s": result["timing"]["forward_s"],
        "peak_rss_mb": peak_mb,
        "plan": {key: result["plan"][key] for key in (
            "k", "depth", "max_live_checkpoints", "max_live_graphs", "extra_passes", "state_bytes",
            "graph_bytes", "planned_memory_mb")},
        "val_loss": result["val_loss"],
        "unrolled_mb_per_step": slope["mb_per_step"],
        "unrolled_probe": slope["points"],
        "unrolled_would_need_gb": slope["mb_per_step"] * args.steps / 1024,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\n{summary['num_params']:,} parameters, T={args.steps}: metagradient in "
        f"{summary['metagradient_s']:.0f} s (training forward pass {summary['forward_s']:.0f} s), "
        f"peak RSS {peak_mb:.0f} MB; the full unroll grows {slope['mb_per_step']:.1f} MB per step: "
        f"~{summary['unrolled_would_need_gb']:.1f} GB for this run"
    )
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
