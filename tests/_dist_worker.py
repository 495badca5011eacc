"""One rank of a data-parallel metagradient (launched by tests/test_distributed.py).

Usage: RANK=r WORLD_SIZE=W MASTER_ADDR=... MASTER_PORT=... python _dist_worker.py OUT OPT VJP
Rank 0 writes the value and metagradients to OUT (.npz).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import mgd
from mgd.data import load_dataset
from mgd.distributed import from_environment

from conftest import OPTIMIZERS, tiny_problem

torch.set_num_threads(1)


def main() -> None:
    out, optimizer, vjp = sys.argv[1:4]
    collective = from_environment("cpu", timeout_s=60)
    make, lr = OPTIMIZERS[optimizer]
    trainer, objective = tiny_problem(load_dataset("digits"), make(), steps=11, lr=lr, weight_decay=1e-2)
    trainer.collective = collective
    meta = {"data_weights": 1 + 0.2 * torch.rand(120, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    result = mgd.metagradient(trainer, objective, meta, k=3, vjp=vjp)
    if collective.is_main:
        np.savez(out, value=np.array(result.value), **{k: v.numpy() for k, v in result.grads.items()})
    torch.distributed.barrier()  # both ranks done before either tears down its gloo threads
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
