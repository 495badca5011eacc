"""Memory facts for planning a REPLAY reverse pass: sizes, the machine's RAM, one step's graph.

The planner (:meth:`mgd.replay.ReplayPlan.choose`) needs three numbers:

* ``S``, the bytes of one stored state (:meth:`mgd.training.TrainState.nbytes`);
* ``G``, the bytes one step's second-order graph keeps alive when a leaf replay hands it to
  the VJP (``vjp="fused"``): measured here by running one step under
  :func:`torch.autograd.graph.saved_tensors_hooks` and adding up the distinct storages autograd
  saves, minus those of the state itself (already counted in ``S``);
* the budget: ``--memory-budget`` (parsed by :func:`parse_memory_size`), by default half of
  the RAM the kernel reports as available (:func:`default_memory_budget`).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = [
    "parse_memory_size", "available_memory_bytes", "default_memory_budget", "step_graph_bytes", "format_bytes",
]

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40, "TB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str) -> int:
    """``"512MB"``, ``"1.5G"``, ``"2GiB"`` or a plain number of bytes → bytes (binary units)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper().replace("IB", "B") if match else None
    if not match or unit not in _UNITS:
        raise UserError(
            f"cannot read memory size {text!r}; write a number with an optional unit, e.g. 500MB or 2GB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise UserError(f"memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``1536 → '1.5 KB'`` (binary units), for messages and tables."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (``None`` where there is no procfs)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other POSIX systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int | None:
    """Half of the available RAM: room for the model, the data and everything else."""
    available = available_memory_bytes()
    return None if available is None else available // 2


def step_graph_bytes(
    trainer, state, local: Mapping[str, Tensor], wrt: Sequence[str]
) -> int:
    """Bytes that one step's second-order graph keeps alive, beyond the state it starts from.

    Runs :meth:`mgd.step.TrainingRun.linearize` once and sums the distinct storages that autograd
    saves for the second backward pass, plus the gradient and new buffers it keeps. The state
    is excluded: a leaf replay stores it as a checkpoint anyway.
    """
    excluded = {t.untyped_storage().data_ptr() for t in state.tensors()}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        graph = trainer.linearize(state, local, wrt)
    for kept in (graph.grad, graph.new_buffers):
        storage = kept.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())
