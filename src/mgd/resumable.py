"""A metagradient pass that survives being killed: its progress, saved in a directory.

:func:`mgd.replay.metagradient` with ``state_dir=DIR`` keeps, in ``DIR``:

* ``pass.json``: which pass this is (steps, the plan, the metaparameters, the state's size and
  the fingerprint of ``s_0``). A directory made by another pass is refused, and a resumed pass
  runs the saved plan, not one re-chosen from the memory available now;
* ``checkpoints/``: the forward pass's checkpoints and ``s_T`` as raw files, each renamed
  into place once complete (:class:`~mgd.checkpoints.CheckpointStore` with ``durable=``);
* ``forward.npz``: how far the forward pass got (the last checkpoint written) with the
  fingerprints of every state and step up to there;
* ``reverse.npz``: at the end of a root segment of the reverse pass (the first one, then at
  most every :data:`REVERSE_EVERY_S` seconds), the adjoint, the metagradient summed so far and
  the replay checks' flags.

Every file is replaced atomically, and ``forward.npz`` is written only after the checkpoint
it names, so a kill at any moment leaves a consistent directory. Files are not flushed with
``fsync`` (the pass would wait for the disk): they survive the process being killed, which
is what resuming is for; after a machine crash, start a new run. Given the directory again,
the pass continues from the last record: the forward pass from its last checkpoint, the
reverse pass after its last finished segment, with the same arithmetic in the same order, so
the result equals an uninterrupted pass bit for bit.

:class:`ResumableRun` is the run directory around such a pass (``mgd grad --out``/``--resume``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mgd.errors import UserError
from mgd.io import atomic_write_bytes, load_npz, write_json
from mgd.runs import RunDirectory

__all__ = ["PassProgress", "ResumableRun", "remove_pass", "REVERSE_EVERY_S"]

#: Seconds between two records of the reverse pass's progress (after the first).
REVERSE_EVERY_S = 10.0


def _to_bytes(tensor: Tensor) -> np.ndarray:
    """A tensor's raw bytes (any dtype, bfloat16 included) as a uint8 array."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().copy() if flat.numel() else np.zeros(0, dtype=np.uint8)


def _from_bytes(raw: np.ndarray, like: Tensor) -> Tensor:
    if like.numel() == 0:
        return torch.empty_like(like)
    return torch.from_numpy(np.ascontiguousarray(raw)).view(like.dtype).reshape(like.shape).to(like.device)


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: the adjoint is as large as a state
    atomic_write_bytes(path, buffer.getvalue(), sync=False)  # survives a kill; see the module docstring


class PassProgress:
    """The saved progress of one metagradient pass in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, identity: dict, *,
                 checkpoint_parent: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self._last_reverse: float | None = None
        path = self.directory / "pass.json"
        self.saved_plan: dict | None = None
        if path.is_file():
            saved = json.loads(path.read_text())
            differing = sorted(key for key in identity if saved.get(key) != identity[key])
            if differing:
                raise UserError(
                    f"{self.directory} holds the progress of another pass (it differs in "
                    f"{', '.join(differing)}); resume with the original run or start a new one"
                )
            self.saved_plan = saved["plan"]
            self.checkpoints = Path(saved["checkpoints"])
        elif checkpoint_parent is not None:  # the checkpoint files go where the disk tier is asked to go
            self.checkpoints = Path(checkpoint_parent) / f"mgd-pass-{os.getpid()}-{time.time_ns()}"
        else:
            self.checkpoints = self.directory / "checkpoints"

    def start(self, plan: dict) -> None:
        """Record the pass (once, before the first checkpoint is written)."""
        if self.saved_plan is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create the pass directory {self.directory}: {error.strerror or error}") from None
            write_json(self.directory / "pass.json",
                       {**self.identity, "plan": plan, "checkpoints": str(self.checkpoints.resolve())})
            self.saved_plan = plan

    # ------------------------------------------------------------------ forward
    def save_forward(self, reached: int, forward_fp: np.ndarray, loss_fp: np.ndarray, loss_sums: np.ndarray) -> None:
        """The forward pass has durably stored the checkpoint of step ``reached``."""
        _write_arrays(self.directory / "forward.npz", {
            "reached": np.asarray(reached), "forward_fp": forward_fp[: reached + 1],
            "loss_fp": loss_fp[:reached], "loss_sums": _to_bytes(torch.as_tensor(loss_sums[:reached])),
        })

    def load_forward(self, loss_sums_like: Tensor) -> dict | None:
        """The saved forward progress (``None``: none yet); its loss sums as a tensor like
        ``loss_sums_like`` (the pass's ``(T,)`` buffer), cut to the steps reached."""
        path = self.directory / "forward.npz"
        if not path.is_file():
            return None
        arrays = load_npz(path, what=f"the saved pass in {self.directory}")
        reached = int(arrays["reached"])
        return {"reached": reached, "forward_fp": arrays["forward_fp"], "loss_fp": arrays["loss_fp"],
                "loss_sums": _from_bytes(arrays["loss_sums"], loss_sums_like[:reached])}

    # ------------------------------------------------------------------ reverse
    def due(self) -> bool:
        """Whether the reverse pass should record its progress now: at the end of its first
        root segment, then at most every :data:`REVERSE_EVERY_S` seconds (each record writes
        a state-sized adjoint; a kill loses at most that much work)."""
        return self._last_reverse is None or time.perf_counter() - self._last_reverse >= REVERSE_EVERY_S

    def save_reverse(self, op_index: int, adjoint: tuple[Tensor, ...], grads: dict[str, Tensor],
                     partial: dict[str, Tensor], flags: dict[str, Tensor], counters: dict) -> None:
        """The reverse pass has done every operation up to ``op_index`` of the schedule."""
        arrays = {"op_index": np.asarray(op_index), "counters": np.frombuffer(json.dumps(counters).encode(), np.uint8)}
        arrays.update({f"adjoint_{i}": _to_bytes(t) for i, t in enumerate(adjoint)})
        arrays.update({f"grad_{name}": _to_bytes(t) for name, t in grads.items()})
        arrays.update({f"partial_{name}": _to_bytes(t) for name, t in partial.items()})
        arrays.update({f"flag_{name}": _to_bytes(t) for name, t in flags.items()})
        _write_arrays(self.directory / "reverse.npz", arrays)
        self._last_reverse = time.perf_counter()

    def load_reverse(self, adjoint_like: tuple[Tensor, ...], grads_like: dict[str, Tensor],
                     partial_like: dict[str, Tensor], flags_like: dict[str, Tensor]) -> dict | None:
        path = self.directory / "reverse.npz"
        if not path.is_file():
            return None
        arrays = load_npz(path, what=f"the saved pass in {self.directory}")
        return {
            "op_index": int(arrays["op_index"]),
            "counters": json.loads(arrays["counters"].tobytes().decode()),
            "adjoint": tuple(_from_bytes(arrays[f"adjoint_{i}"], t) for i, t in enumerate(adjoint_like)),
            "grads": {name: _from_bytes(arrays[f"grad_{name}"], t) for name, t in grads_like.items()},
            "partial": {name: _from_bytes(arrays[f"partial_{name}"], t) for name, t in partial_like.items()},
            "flags": {name: _from_bytes(arrays[f"flag_{name}"], t) for name, t in flags_like.items()},
        }


def remove_pass(directory: str | os.PathLike) -> None:
    """Remove a pass's saved progress: ``directory`` and its checkpoint files, wherever they are."""
    directory = Path(directory)
    try:
        checkpoints = json.loads((directory / "pass.json").read_text())["checkpoints"]
    except (OSError, ValueError, KeyError):
        checkpoints = None
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


class ResumableRun:
    """A run directory ``OUT`` whose metagradient pass saves its progress in ``OUT/pass``
    (``mgd grad --out OUT``, continued with ``--resume OUT``).

    :meth:`open` starts or resumes it; ``finished`` says a resumed run had already written its
    result. :meth:`discard_unstarted` removes what a pass refused before training left behind,
    :meth:`complete` the progress once the outputs are written.
    """

    def __init__(self, out: Path, *, created: bool, finished: bool):
        self.out, self.created, self.finished = out, created, finished

    @classmethod
    def open(cls, out: str | os.PathLike, *, command: str, config: dict, resume: bool) -> "ResumableRun":
        """Resume ``out`` (the command and config must match), or start a run there. A new run
        may replace an earlier run's outputs but never an unfinished pass."""
        out = Path(out)
        if resume:
            RunDirectory.resume(out, command=command, config=config)
            finished = not (out / "pass").is_dir() and (out / "result.json").is_file()
            return cls(out, created=False, finished=finished)
        if (out / "pass").is_dir():
            raise UserError(f"{out} holds an unfinished pass; continue it with --resume {out}, or choose another --out")
        created = not out.exists()
        RunDirectory.create(out, command=command, config=config, overwrite=True)
        return cls(out, created=created, finished=False)

    @property
    def state_dir(self) -> str:
        return str(self.out / "pass")

    def discard_unstarted(self) -> None:
        """If the pass was refused before training began (a bad plan, a bad directory), remove
        what this run created: nothing is left behind."""
        if Path(self.state_dir, "forward.npz").is_file():
            return  # it got somewhere: keep it for --resume
        remove_pass(self.state_dir)
        (self.out / "run.json").unlink(missing_ok=True)
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()

    def complete(self) -> None:
        """The outputs are written: the pass's progress is no longer needed."""
        remove_pass(self.state_dir)
