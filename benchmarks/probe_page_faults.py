#!/usr/bin/env python
"""probe_page_faults: minor page faults per training step, mgd against torch.optim (4 x 768 GPT-2).

With one flat parameter vector, every parameter-sized temporary is one large allocation that
glibc maps fresh (``mmap``), so each step faults its pages in again; ``torch.optim``'s
per-parameter temporaries are recycled. Compare::

    python benchmarks/probe_page_faults.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/probe_page_faults.py
"""
import copy
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_lm100m_bergson  # noqa: E402
import peer_bergson as pb  # noqa: E402

SHAPE = {"layers": 4, "heads": 12, "width": 768}
STEPS = 8


def measured(name: str, train) -> None:
    """Run ``train`` once to warm up, then print its seconds and minor page faults per step."""
    train()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    train()
    seconds = time.perf_counter() - started
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / STEPS
    print(f"{name}: {seconds:.2f} s, minor faults per step {per_step:.0f} ({per_step * 4096 / 2**20:.0f} MB/step)")


def main() -> int:
    torch.set_num_threads(1)
    run, _ = bench_lm100m_bergson.mgd_run(STEPS, SHAPE)
    measured("mgd", run.run)
    problem = pb.make_problem(0, STEPS, pb.BATCH_SIZE, **SHAPE)
    model = copy.deepcopy(problem.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.01)
    weights = torch.ones(pb.BATCH_SIZE)

    def torch_loop() -> None:
        for t in range(STEPS):
            x = problem.train[problem.batches[t]]
            loss = pb.train_loss(model(x).logits, x, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    measured("torch", torch_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
