r"""Data-parallel training and REPLAY on ``torch.distributed``, with explicit collectives.

Every rank holds the whole (replicated) training state and computes its *shard* of every
minibatch: rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of the batch of step
``t`` (:meth:`mgd.training.Trainer.shard_indices`), a pure function of ``(seed, t, W)``. Its
loss is ``(1/B) Σ_{i ∈ shard} w_i ℓ_i`` with the *full* batch size ``B``, so the all-reduced
(summed) shard gradients are the single-process minibatch gradient
``g = Σ_r g_r``. Every rank then applies the same optimizer update: states stay replicated,
and replaying a rank's steps reproduces them bit for bit.

The reverse pass mirrors it. The update's VJP (``ḡ``, the optimizer state's adjoint, the
learning-rate and weight-decay terms) is computed identically on every rank; the
Hessian-vector product is a sum over shards, ``H ḡ = Σ_r H_r ḡ``, and is all-reduced each
step; metaparameters that act through the loss (data weights, input perturbations) get
contributions only from the rank that holds the example, accumulated locally and all-reduced
once at the end. The result equals the single-process metagradient up to the order of
floating-point sums (the tests ask for 1e-10 in float64).

There is no ``DistributedDataParallel`` wrapper: the training core is functional and calls
:meth:`Collective.all_reduce_sum` where a sum over shards is needed (``peers.md`` §4: DDP and
``torch.func`` do not compose, and double backward through DDP is unsupported).

Launch with ``torchrun --nproc-per-node N -m mgd grad ...``; :func:`from_environment` reads
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and starts gloo (CPU) or NCCL
(CUDA). A rank that dies or hangs makes the others fail with :class:`DistributedError`
within the timeout instead of waiting forever.

.. danger::
   Bit-exact replay across ranks needs the same world size, backend and device on every
   rank and between a run and its resume; ``mgd`` records them in ``result.json`` and
   ``run.json`` and refuses a resume that differs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = [
    "Collective",
    "SINGLE_PROCESS",
    "ProcessGroupCollective",
    "DistributedError",
    "from_environment",
    "launched_by_torchrun",
]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagreed."""


def first_line(error: BaseException) -> str:
    """The first line of an error's text (backends raise pages), or its type when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class Collective:
    """One process: sums over ranks are the identity.

    Attributes:
        rank, world_size: this process's rank and the number of processes.
        backend: ``"none"``, ``"gloo"`` or ``"nccl"``.
    """

    rank: int = 0
    world_size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that prints and writes outputs."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """``Σ_r tensor_r`` on every rank (a new tensor; the input is not modified)."""
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """``[value_0, ..., value_{W-1}]`` on every rank (small Python objects only)."""
        return [value]

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE_PROCESS = Collective()


@dataclass(frozen=True)
class ProcessGroupCollective(Collective):
    """The default ``torch.distributed`` process group (started by :func:`from_environment`)."""

    timeout_s: float = 300.0

    def _fail(self, error: Exception, what: str) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed; another rank probably stopped or "
            f"did not answer within {self.timeout_s:g} s ({first_line(error)})"
        )

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        result = tensor.detach().clone()
        try:
            dist.all_reduce(result, op=dist.ReduceOp.SUM)
        except Exception as error:  # gloo/NCCL raise RuntimeError subclasses with long texts
            raise self._fail(error, "all_reduce") from None
        return result

    def all_gather_object(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, value)
        except Exception as error:
            raise self._fail(error, "all_gather") from None
        return gathered


def launched_by_torchrun() -> bool:
    """Whether the environment describes more than one process (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: torch.device | str = "cpu", timeout_s: float = 300.0) -> Collective:
    """The collective this process belongs to: :data:`SINGLE_PROCESS` unless under torchrun.

    Starts the default process group from the ``torchrun`` environment: NCCL on CUDA, gloo on
    CPU, with ``timeout_s`` for every collective (a rank that dies makes the others fail
    instead of hanging).

    Raises:
        UserError: an incomplete environment, or more ranks than GPUs on one node.
    """
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    import torch.distributed as dist

    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE > 1 but {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc-per-node N -m mgd ...`"
        )
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UserError(
                    f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); use "
                    "--nproc-per-node at most the number of GPUs"
                )
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # rendezvous failures are long multi-line texts
            raise DistributedError(
                f"rank {os.environ['RANK']}: could not join the {backend} process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({first_line(error)})"
            ) from None
    return ProcessGroupCollective(dist.get_rank(), dist.get_world_size(), backend, timeout_s)


def check_replicated(collective: Collective, fingerprint: Tensor, what: str) -> None:
    """Raise :class:`DistributedError` if ranks hold different values of a fingerprint."""
    if collective.world_size == 1:
        return
    values = collective.all_gather_object(fingerprint.detach().cpu().tolist())
    if any(v != values[0] for v in values):
        raise DistributedError(
            f"ranks hold different {what}: training is not replicated (different seeds, data, "
            "thread counts or library versions across ranks?)"
        )
