#!/usr/bin/env python
"""bench_lm100m_bergson: ``mgd`` and EleutherAI bergson's MAGIC side by side on a 106M-parameter LM.

The problem is ``peer_bergson.make_problem(0, T, shape=LM100M)``: ``peer_bergson``'s GPT-2 LM
(untied embeddings, dropout 0, vocabulary 128, 32-token sequences, 256 training and 64 query
sequences, bergson's batch order, batch 16) at 15 layers, 12 heads and width 768, i.e.
106.5M parameters, fully fine-tuned with AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8,
eps_root 1e-16, weight decay 0.01; ``peer_bergson.OPTIMIZERS``). One AdamW state is 1.28 GB
in float32. Untied embeddings because bergson's scores are wrong with tied ones
(``../shared/notes/peers.md`` §5); dropout 0 and a constant LR because that is the problem
``peer_bergson`` defines for both. ``mgd`` runs it through ``bench_runs.lm_run`` (the same
batches, bergson's weighted mean cross-entropy) and differentiates per-example data weights
*and* per-step LR multipliers; bergson differentiates the data weights only.

In one process, on the same hardware, one torch thread by default:

1. ``mgd``: a warm-up at T = 2, then ``run.run()`` (its training) and ``mgd.metagradient``
   (the default plan, or the ``--memory-budget``/``--host-budget``/``--disk-budget`` tiers);
   time and peak extra RSS of each;
2. bergson: ``peer_bergson.run_bergson(shape=LM100M)``: its own warm-up at T = 3, its own
   training (``Trainer.train``), a plain ``torch.optim.AdamW`` loop (the common baseline),
   then its metagradient (forward with DCP checkpoints on disk, ``save_mode="sqrt"``, query
   gradient, ``Trainer.backward``); time, peak extra RSS, checkpoint bytes on disk;
3. the two float32 data-weight metagradients' relative difference;
4. exactness at ``--check-steps`` (default 1; ``--check-only`` runs only this) in float64: ``peer_bergson.full_unroll_reference``
   (plain autograd through the unrolled run, its own hand-written AdamW) against ``mgd``'s
   metagradient and bergson's, both in float64.

Ratios are taken against each library's own training in this process, and both against the
same ``torch.optim`` loop. Run alone (the machine has 2 cores)::

    python benchmarks/bench_lm100m_bergson.py --steps 30 --out docs/bench_lm100m_bergson.json
    python benchmarks/bench_lm100m_bergson.py --layers 2 --heads 2 --width 64 --steps 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import bench_runs  # noqa: E402
import mgd  # noqa: E402
import peer_bergson as pb  # noqa: E402
from mgd._resources import peak_memory  # noqa: E402
from mgd.io import atomic_write_bytes  # noqa: E402
from mgd.memory import format_bytes, parse_memory_size  # noqa: E402

OPTIMIZER = "adamw"


def mgd_run(steps: int, shape: dict[str, int], dtype: torch.dtype = torch.float32):
    """``(run, objective)``: the problem as an ``mgd`` run, its model cast to ``dtype``."""
    problem = pb.make_problem(0, steps, pb.BATCH_SIZE, **shape)
    return bench_runs.lm_run(problem.model.to(dtype), problem, OPTIMIZER, steps)


def mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=pb.LM100M["layers"])
    parser.add_argument("--heads", type=int, default=pb.LM100M["heads"])
    parser.add_argument("--width", type=int, default=pb.LM100M["width"])
    parser.add_argument("--memory-budget", type=parse_memory_size, default=None)
    parser.add_argument("--host-budget", type=parse_memory_size, default=None)
    parser.add_argument("--disk-budget", type=parse_memory_size, default=None)
    parser.add_argument("--vjp", choices=mgd.replay.VJP_MODES, default="fused", help="mgd's per-step VJP (default: %(default)s, the engine's)")
    parser.add_argument("--workdir", default=None, help="bergson's and mgd's checkpoint folder (default: temporary)")
    parser.add_argument("--check-steps", type=int, default=1, help="float64 exactness horizon (0: skip)")
    parser.add_argument("--check-only", action="store_true", help="only the float64 exactness check")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = {"layers": args.layers, "heads": args.heads, "width": args.width}
    tiers = {"memory_budget": args.memory_budget, "host_budget": args.host_budget, "disk_budget": args.disk_budget}

    if args.check_only:
        return check(args, shape, {})
    run, objective = mgd_run(args.steps, shape)
    report = {"problem": "peer_bergson.make_problem(0, T, shape)", "shape": shape, "params": run.num_params,
              "state_bytes": run.init_state().nbytes(), "steps": args.steps, "batch_size": pb.BATCH_SIZE,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "bergson": pb._version("bergson"), "mgd_budgets": tiers,
              "mgd_vjp": args.vjp}
    print(f"GPT-2 {args.layers}x{args.width} untied: {run.num_params / 1e6:.1f}M parameters, AdamW state "
          f"{format_bytes(report['state_bytes'])}, T = {args.steps}, batch {pb.BATCH_SIZE} x {pb.SEQ_LEN}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as where:
        def metagradient(run, objective):
            return mgd.metagradient(run, objective, checkpoint_dir=where, vjp=args.vjp, **tiers)

        warm_run, warm_objective = mgd_run(2, shape)
        warm_run.run()
        metagradient(warm_run, warm_objective)
        del warm_run, warm_objective
        with peak_memory() as memory:
            started = time.perf_counter()
            run.run()
            train_s = time.perf_counter() - started
        train_rss = memory.extra_bytes
        with peak_memory() as memory:
            started = time.perf_counter()
            result = metagradient(run, objective)
            grad_s = time.perf_counter() - started
    plan = result.plan
    ours = {"train_s": train_s, "train_peak_extra_mb": mb(train_rss), "metagrad_s": grad_s,
            "ratio": grad_s / train_s, "metagrad_peak_extra_mb": mb(memory.extra_bytes),
            "timings": result.timings, "plan": {"k": plan.k, "depth": plan.depth,
                                                "extra_passes": plan.extra_passes},
            "planned_tier_bytes": result.memory.get("planned_tier_bytes"),
            "metaparams": sorted(result.grads), "vjp": result.vjp}
    report["mgd"] = ours
    print(f"mgd: training {train_s:.1f} s, metagradient {grad_s:.1f} s = {ours['ratio']:.2f}x, peak extra RSS "
          f"{format_bytes(memory.extra_bytes or 0)} (training {format_bytes(train_rss or 0)}); plan k = {plan.k}, "
          f"depth {plan.depth}, {plan.extra_passes:.2f} extra passes, VJP {result.vjp}", flush=True)
    ours_w = result.grads["data_weights"].numpy()
    del run, objective, result

    theirs = bench_runs._bergson(optimizer=OPTIMIZER, steps=args.steps, shape=shape, threads=args.threads,
                                 workdir=args.workdir)
    their_w = theirs.pop("data_weight_grad")
    report["bergson"] = theirs
    report["torch_train_s"] = theirs["torch_train_s"]
    ours["ratio_vs_torch_train"] = grad_s / theirs["torch_train_s"]
    report["w_rel_diff_float32"] = pb.relative_error(ours_w, their_w)
    print(f"bergson: training {theirs['train_s']:.1f} s, metagradient {theirs['metagrad_s']:.1f} s = "
          f"{theirs['ratio']:.2f}x (forward {theirs['forward_s']:.1f}, backward {theirs['backward_s']:.1f}), "
          f"peak extra RSS {theirs['metagrad_peak_rss_growth_mb']:.0f} MiB, checkpoints on disk "
          f"{theirs['checkpoint_disk_mb']:.0f} MiB", flush=True)
    print(f"against the same torch.optim loop ({theirs['torch_train_s']:.1f} s): mgd {ours['ratio_vs_torch_train']:.2f}x, "
          f"bergson {theirs['ratio_vs_torch_train']:.2f}x; float32 data-weight metagradients differ by "
          f"{report['w_rel_diff_float32']:.2e} (relative)", flush=True)

    write(args.out, report)  # before the check, which needs the most memory
    return check(args, shape, report) if args.check_steps else 0


def write(path: Path | None, report: dict) -> None:
    if path is not None:
        atomic_write_bytes(path, (json.dumps(report, indent=2, default=float) + "\n").encode())


def check(args, shape: dict[str, int], report: dict) -> int:
    """Exactness at ``--check-steps`` in float64: mgd and bergson against the full unroll."""
    reference = pb.full_unroll_reference(optimizer=OPTIMIZER, steps=args.check_steps, dtype=torch.float64,
                                         shape=shape)["data_weight_grad"]
    run64, objective64 = mgd_run(args.check_steps, shape, torch.float64)
    ours64 = mgd.metagradient(run64, objective64).grads["data_weights"].numpy()
    del run64, objective64
    theirs64 = bench_runs._bergson(optimizer=OPTIMIZER, steps=args.check_steps, shape=shape, threads=args.threads,
                                   workdir=args.workdir, dtype=torch.float64, warmup_steps=0,
                                   torch_baseline=False)["data_weight_grad"]
    report["check"] = {"steps": args.check_steps, "mgd_rel_err_float64": pb.relative_error(ours64, reference),
                       "bergson_rel_err_float64": pb.relative_error(theirs64, reference)}
    print(f"float64 at T = {args.check_steps} against the full unroll: mgd {report['check']['mgd_rel_err_float64']:.1e}, "
          f"bergson {report['check']['bergson_rel_err_float64']:.1e}", flush=True)
    write(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
