#!/usr/bin/env python
"""bench_cli: what ``mgd grad`` costs next to ``mgd train``, both timed as whole processes.

For each optimizer, ``--repeats`` rounds each run ``mgd train`` and then ``mgd grad`` (the
default plan and VJP, so a resumable pass: ``mgd grad --out`` saves its progress) on the
digits MLP for ``--steps`` steps, each in a fresh process with one torch thread. It prints
the median wall time of each command, their ratio, and the median peak RSS of each process
(``wait4``'s ``ru_maxrss``) with the difference. Start-up (importing torch, loading the data)
is inside both, as a user pays it.

Run alone::

    python benchmarks/bench_cli.py --steps 3000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizers", default="sgd,adam")
    args = parser.parse_args(argv)
    mgd = [sys.executable, "-m", "mgd"]
    print(f"| optimizer | mgd train (s) | mgd grad (s) | ratio | train peak RSS (MB) | grad peak RSS (MB) | "
          f"difference (MB) |\n|---|---|---|---|---|---|---|")
    for optimizer in args.optimizers.split(","):
        common = ["--dataset", "digits", "--steps", str(args.steps), "--optimizer", optimizer, "--threads", "1",
                  "--quiet"]
        train, grad = [], []
        with tempfile.TemporaryDirectory() as where:
            for i in range(args.repeats):
                train.append(timed([*mgd, "train", *common, "--out", f"{where}/t{i}"]))
                grad.append(timed([*mgd, "grad", *common, "--out", f"{where}/g{i}"]))
        t = statistics.median(s for s, _ in train)
        g = statistics.median(s for s, _ in grad)
        rt = statistics.median(r for _, r in train) / 2**20
        rg = statistics.median(r for _, r in grad) / 2**20
        print(f"| {optimizer} | {t:.2f} | {g:.2f} | {g / t:.2f}x | {rt:.0f} | {rg:.0f} | {rg - rt:+.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
