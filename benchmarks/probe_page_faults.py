#!/usr/bin/env python
"""probe_page_faults: minor page faults per training step, mgd against torch.optim (4 x 768 GPT-2).

With one flat parameter vector, every parameter-sized temporary is one large allocation that
glibc maps fresh (``mmap``), so each step faults its pages in again; ``torch.optim``'s
per-parameter temporaries are recycled. Compare::

    python benchmarks/probe_page_faults.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/probe_page_faults.py
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import copy
import resource
import time
import torch
torch.set_num_threads(1)
import bench_lm100m_bergson as b, peer_bergson as pb
shape = {"layers": 4, "heads": 12, "width": 768}
run, obj = b.mgd_run(8, shape)
run.run()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter(); run.run(); dt = time.perf_counter() - t
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(f"mgd: {dt:.2f} s, minor faults per step {(f1 - f0) / 8:.0f} ({(f1 - f0) / 8 * 4096 / 2**20:.0f} MB/step)")
problem = pb.make_problem(0, 8, pb.BATCH_SIZE, **shape)
model = copy.deepcopy(problem.model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.01)
w = torch.ones(16)
def loop():
    for t in range(8):
        x = problem.train[problem.batches[t]]
        loss = pb.train_loss(model(x).logits, x, w)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
loop()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter(); loop(); dt = time.perf_counter() - t
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(f"torch: {dt:.2f} s, minor faults per step {(f1 - f0) / 8:.0f} ({(f1 - f0) / 8 * 4096 / 2**20:.0f} MB/step)")
