#!/usr/bin/env python
"""bench_lm100m: the exact metagradient of a GPT-2-style LM with over 100M parameters, on the CPU,
with checkpoints spilling to host memory and disk.

The model is ``examples/gpt_lm.py``'s GPT-2 (``transformers.GPT2LMHeadModel``, tied embeddings,
dropout 0.1) at width 768, 15 layers and 12 heads: 106M parameters, randomly initialised.
It is fully fine-tuned with AdamW (warm-up + cosine, clipping at 1) on that example's
machine-local corpus (docstrings of the standard library, one character per token, 32-token
documents). The metaparameters are one weight per training document and one LR multiplier
per step. One AdamW state (parameters and both moments) is 1.2 GB in float32, so 100 steps
of checkpoints do not fit in this machine's 24 GB RAM: the run is planned with a small
device budget, ``--host-budget`` and ``--disk-budget``.

What it prints, measured in the same process:
* the time of ``mgd``'s own training of the run, and its peak RSS;
* the metagradient's time and ratio to training, the plan (tree, replayed steps), the bytes
  per tier planned and held as counted by the checkpoint store, the disk bytes written and
  read, the seconds the reverse pass waited for reads, and the peak RSS;
* a check, on the first ``--check-steps`` steps: the tiered plan's metagradient equals the
  in-memory store-everything one bit for bit.

Run alone (the machine has 2 cores)::

    python benchmarks/bench_lm100m.py --steps 100 --memory-budget 8GB --host-budget 4GB \\
        --disk-budget 40GB --out bench-lm100m.json
    python benchmarks/bench_lm100m.py --layers 1 --width 64 --heads 2 --steps 8 --memory-budget 1MB \\
        --host-budget 1MB --disk-budget 1GB          # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import gpt_lm  # noqa: E402
import mgd  # noqa: E402
from mgd._resources import peak_memory  # noqa: E402
from mgd.memory import format_bytes, parse_memory_size  # noqa: E402


def build(args, steps: int):
    return gpt_lm.build(0, steps, "float32", "cpu", n_train=args.train, n_val=args.val, context=32,
                        width=args.width, layers=args.layers, heads=args.heads, batch_size=args.batch_size,
                        micro_batch=args.batch_size, lr=args.lr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--memory-budget", type=parse_memory_size, default=parse_memory_size("8GB"))
    parser.add_argument("--host-budget", type=parse_memory_size, default=parse_memory_size("4GB"))
    parser.add_argument("--disk-budget", type=parse_memory_size, default=parse_memory_size("40GB"))
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--check-steps", type=int, default=3, help="steps of the bit-for-bit check (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = build(args, args.steps)
    run = task.run
    state_bytes = run.init_state().nbytes()
    report = {"params": run.num_params, "state_bytes": state_bytes, "steps": args.steps, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "budgets": {"device": args.memory_budget, "host": args.host_budget, "disk": args.disk_budget}}
    print(f"GPT-2 {args.layers}x{args.width}: {run.num_params / 1e6:.1f}M parameters, AdamW state "
          f"{format_bytes(state_bytes)}, T = {args.steps}, batch {args.batch_size} x 32 tokens", flush=True)

    with peak_memory() as memory:
        started = time.perf_counter()
        run.run()
        train_s = time.perf_counter() - started
    report["training"] = {"seconds": train_s, "per_step_s": train_s / args.steps, "peak_extra_rss": memory.extra_bytes}
    print(f"training: {train_s:.1f} s ({train_s / args.steps:.2f} s/step), peak extra RSS "
          f"{format_bytes(memory.extra_bytes or 0)}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as where, peak_memory() as memory:
        started = time.perf_counter()
        result = mgd.metagradient(run, task.objective, vjp="double-backward", memory_budget=args.memory_budget,
                                  host_budget=args.host_budget, disk_budget=args.disk_budget, checkpoint_dir=where)
        grad_s = time.perf_counter() - started
    plan = result.plan
    io = result.memory["checkpoint_io"]
    report["metagradient"] = {
        "seconds": grad_s, "ratio": grad_s / train_s, "timings": result.timings, "peak_extra_rss": memory.extra_bytes,
        "plan": {"k": plan.k, "depth": plan.depth, "root_segments": None if plan.root is None else len(plan.root) - 1,
                 "replayed_steps": plan.replayed_steps, "extra_passes": plan.extra_passes},
        "planned_tier_bytes": result.memory["planned_tier_bytes"], "store": io,
        "grad_norms": {name: float(g.norm()) for name, g in result.grads.items()},
    }
    tiers = result.memory["planned_tier_bytes"]
    print(f"metagradient: {grad_s:.1f} s = {grad_s / train_s:.2f}x training; plan k = {plan.k}, depth {plan.depth}, "
          f"{plan.replayed_steps} replayed steps; planned device {format_bytes(tiers['device'])}, host "
          f"{format_bytes(tiers['host'])}, disk {format_bytes(tiers['disk'])}; held at the peak: device "
          f"{format_bytes(io['peak_bytes']['device'])}, host {format_bytes(io['peak_bytes']['host'])}, disk "
          f"{format_bytes(io['peak_bytes']['disk'])}; disk written {format_bytes(io['disk_written_bytes'])}, read "
          f"{format_bytes(io['disk_read_bytes'])}, waited {io['wait_seconds']:.2f} s; peak extra RSS "
          f"{format_bytes(memory.extra_bytes or 0)}", flush=True)

    if args.check_steps:
        short = build(args, args.check_steps)
        s = short.run.init_state().nbytes()
        in_memory = mgd.metagradient(short.run, short.objective, mode="unrolled", vjp="double-backward")
        with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as where:
            tiered = mgd.metagradient(short.run, short.objective, mode="unrolled", vjp="double-backward",
                                      host_budget=s, disk_budget=10 * s, checkpoint_dir=where)
        same = all(torch.equal(in_memory.grads[n], tiered.grads[n]) for n in in_memory.grads)
        placed = tiered.plan.to_dict()["placement"]
        report["check"] = {"steps": args.check_steps, "bit_identical": same, "placement": placed}
        print(f"check at T = {args.check_steps}: host + disk tiers ({placed}) equal to the in-memory pass bit "
              f"for bit: {same}", flush=True)
        if not same:
            return 1
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
