"""Where REPLAY keeps its checkpoints: device memory, then host memory, then disk.

A :class:`CheckpointStore` is what :func:`mgd.replay.metagradient` stores states in: a
mapping ``step -> TrainState`` whose entries live in one of three tiers, fixed per step by the
plan (:attr:`mgd.replay.ReplayPlan.placement`, made by :meth:`~mgd.replay.ReplayPlan.choose`
from ``--memory-budget``, ``--host-budget`` and ``--disk-budget``):

* ``device``: the tensors themselves, where training runs;
* ``host``: a copy in CPU memory (pinned when the run is on a GPU). On a CPU run the device
  *is* host memory, so the state is kept as it is and only counted as host bytes;
* ``disk``: one raw file per state in a private directory, written by a background thread so
  that training does not wait. Files hold each tensor's bytes, padded to 64-byte boundaries,
  in the order of :meth:`~mgd.step.TrainState.tensors`, and ``layout.json`` says how to read
  them: raw bytes, never pickle.

Only long-lived checkpoints are moved off the device: the plan offloads the states the forward
pass stores (the root of the replay tree), which the reverse pass reads once each, in
descending step order. So whenever one of them is read, the next one down is prefetched in
the background (copied to the device from host memory, or read from disk), and the replay of
a segment does not wait for the next segment's start.

Failure is loud and clean: a write that fails (full disk, unwritable directory) leaves no
partial file (each file is written under a temporary name and renamed), and the next access
raises :class:`~mgd.errors.UserError` naming the directory and the fix. :meth:`close` removes
the directory unless asked to keep it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping

import numpy as np
import torch
from torch import Tensor

from mgd.errors import UserError
from mgd.memory import format_bytes
from mgd.step import TrainState

__all__ = ["TIERS", "CheckpointStore"]

#: Checkpoint tiers, fastest first.
TIERS = ("device", "host", "disk")
_ALIGN = 64


def _layout(state: TrainState) -> list[dict]:
    """Byte offsets, dtypes and shapes of a state's tensors in a checkpoint file."""
    entries, offset = [], 0
    for tensor in state.tensors():
        nbytes = tensor.numel() * tensor.element_size()
        entries.append({"offset": offset, "nbytes": nbytes, "dtype": str(tensor.dtype).removeprefix("torch."),
                        "shape": list(tensor.shape)})
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return entries


def _tensor(raw: np.ndarray, entry: dict) -> Tensor:
    """One tensor of a checkpoint file's bytes, as :func:`_layout` placed it."""
    dtype = getattr(torch, entry["dtype"])
    if entry["nbytes"] == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    piece = torch.from_numpy(raw[entry["offset"]: entry["offset"] + entry["nbytes"]])
    return piece.view(dtype).reshape(entry["shape"])


class CheckpointStore(MutableMapping):
    """``step -> TrainState`` over device, host and disk (see the module docstring).

    Args:
        placement: ``step -> "host" | "disk"`` for states kept off the device
            (:attr:`mgd.replay.ReplayPlan.placement`); every other step stays on the device.
        device: the run's device (states come back there).
        directory: where the disk tier's directory is made (default: the system's temporary
            directory); a fresh ``mgd-checkpoints-*`` folder inside it holds the files.
        keep: keep that folder and every file written to it (one per disk checkpoint, and
            ``layout.json``) when the store closes; otherwise each file goes once it is read.
        durable: a folder that also receives, whatever their tier, a file for each of the
            steps in ``durable_steps``, renamed into place once complete and never removed by
            the store: what a resumed pass reads back (:meth:`adopt`). Disk checkpoints of
            those steps are those files. (They are not flushed with ``fsync``: they survive
            the process being killed, which is what resuming is for, at no cost to the pass.)
        durable_steps: the steps to write there (the forward pass's checkpoints).

    An offloaded state, once read, stays on the device until it is deleted (the reverse pass
    reads it again only within its own segment) and its off-device copy is dropped.
    """

    def __init__(self, placement: Mapping[int, str] | None = None, *, device: torch.device | str = "cpu",
                 directory: str | os.PathLike | None = None, keep: bool = False,
                 durable: str | os.PathLike | None = None, durable_steps=()) -> None:
        self.placement = dict(placement or {})
        unknown = sorted(set(self.placement.values()) - {"host", "disk"})
        if unknown:
            raise UserError(f"unknown checkpoint tier {unknown[0]!r}; choose host or disk")
        self.device = torch.device(device)
        self.keep = keep
        self._where: dict[int, str] = {}  # step -> the tier holding it now
        self._states: dict[int, TrainState] = {}  # device and host tiers, disk files still being written
        self._files: dict[int, Path] = {}
        self._pending: dict[int, Future] = {}  # disk writes in flight
        self._loading: dict[int, Future] = {}  # prefetches in flight
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failed = False  # a write failed (never reset: later records must not claim it)
        self._layout: list[dict] | None = None
        self.directory: Path | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._bytes = {tier: 0 for tier in TIERS}
        self.stats = {"disk_written_bytes": 0, "disk_read_bytes": 0, "prefetched": 0, "wait_seconds": 0.0,
                      "peak_bytes": {tier: 0 for tier in TIERS}}
        self.durable = None if durable is None else Path(durable)
        self.durable_steps = set(durable_steps) if durable is not None else set()
        if self.durable is not None and self.durable.is_dir():
            for stale in self.durable.glob("*.tmp"):  # a write a kill interrupted
                stale.unlink()
        if "disk" in self.placement.values() and not self.durable_steps >= {
                s for s, tier in self.placement.items() if tier == "disk"}:
            self._open_directory(directory)
        if self._executor is None and self.durable is not None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgd-checkpoints")

    # ------------------------------------------------------------------ the disk directory
    def _open_directory(self, parent: str | os.PathLike | None) -> None:
        where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        try:
            where.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="mgd-checkpoints-", dir=where))
        except OSError as error:
            raise UserError(
                f"cannot create a checkpoint directory in {where}: {error.strerror or error}; "
                "choose another --checkpoint-dir"
            ) from None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgd-checkpoints")

    def check_free_space(self, state_bytes: int) -> None:
        """Refuse to start when the files this store will write (one per disk checkpoint, one per
        durable step) do not fit in the free space of their file system."""
        durable = len(self.durable_steps) * state_bytes
        spill = sum(state_bytes for s, tier in self.placement.items() if tier == "disk" and s not in self.durable_steps)
        for folder, needed in ((self.directory, spill), (self.durable, durable)):
            if folder is None or not needed:
                continue
            existing = folder
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            free = shutil.disk_usage(existing).free
            if free < needed:
                self.close()
                raise UserError(
                    f"the checkpoints need {format_bytes(needed)} in {existing}, which has {format_bytes(free)} "
                    "free; choose another --checkpoint-dir, lower --disk-budget or raise --memory-budget / "
                    "--host-budget"
                )

    def _raise_if_failed(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is None:
            return
        where = getattr(error, "mgd_folder", None) or "the checkpoint directory"
        reason = getattr(error, "strerror", None) or str(error)
        self.close()
        raise UserError(
            f"writing a checkpoint to {where} failed: {reason}; free disk space, choose another "
            "--checkpoint-dir or raise --memory-budget / --host-budget"
        )

    def _write(self, step: int, tensors: tuple[Tensor, ...], path: Path) -> None:
        """Runs on the writer thread: the file under a temporary name, then renamed."""
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as handle:
                for tensor, entry in zip(tensors, self._layout):
                    handle.write(memoryview(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy()))
                    pad = -(-entry["nbytes"] // _ALIGN) * _ALIGN - entry["nbytes"]
                    if pad:
                        handle.write(b"\0" * pad)
            os.replace(tmp, path)
        except BaseException as error:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            error.mgd_folder = path.parent.parent if path.parent == self.directory else path.parent
            with self._lock:
                self._error = error
                self._failed = True
            return
        with self._lock:
            self.stats["disk_written_bytes"] += sum(e["nbytes"] for e in self._layout)
            if self._where.get(step) == "disk":  # written: the memory copy may go
                self._states.pop(step, None)
            self._pending.pop(step, None)

    def _read(self, step: int) -> TrainState:
        raw = np.fromfile(self._files[step], dtype=np.uint8)
        tensors = []
        for entry in self._layout:
            tensors.append(_tensor(raw, entry).to(self.device))
        with self._lock:
            self.stats["disk_read_bytes"] += sum(e["nbytes"] for e in self._layout)
        return TrainState.from_tensors(tuple(tensors), step)

    # ------------------------------------------------------------------ accounting
    def _move(self, step: int, tier: str | None, nbytes: int) -> None:
        """Record that ``step`` now lives in ``tier`` (``None``: gone)."""
        old = self._where.pop(step, None)
        if old is not None:
            self._bytes[old] -= nbytes
        if tier is not None:
            self._where[step] = tier
            self._bytes[tier] += nbytes
            peak = self.stats["peak_bytes"]
            peak[tier] = max(peak[tier], self._bytes[tier])

    def tier(self, step: int) -> str:
        """Where ``step`` is now (``KeyError`` if not stored)."""
        return self._where[step]

    # ------------------------------------------------------------------ the mapping
    def __setitem__(self, step: int, state: TrainState) -> None:
        self._raise_if_failed()
        if step in self._where:
            del self[step]
        tier = self.placement.get(step, "device")
        if tier == "device" or (tier == "host" and self.device.type == "cpu"):
            self._states[step] = state  # a CPU run's device is host memory: nothing to copy
        elif tier == "host":
            pin = torch.cuda.is_available()
            self._states[step] = TrainState.from_tensors(
                tuple((t.detach().to("cpu").pin_memory() if pin else t.detach().to("cpu")) for t in state.tensors()),
                step)
        durable = step in self.durable_steps
        if tier == "disk" or durable:
            self._ensure_layout(state)
            cpu = TrainState.from_tensors(tuple(t.detach().to("cpu") for t in state.tensors()), step)
            folder = self.durable if durable else self.directory
            path = folder / f"state-{step:09d}.bin"
            with self._lock:
                self._files[step] = path
                if tier == "disk":
                    self._states[step] = cpu  # until written; a read before then needs no disk
                self._pending[step] = self._executor.submit(self._write, step, cpu.tensors(), path)
        self._move(step, tier, state.nbytes())

    def _ensure_layout(self, state: TrainState) -> None:
        if self._layout is None:
            self._layout = _layout(state)
            for folder in (self.directory, self.durable):
                if folder is not None:
                    try:
                        folder.mkdir(parents=True, exist_ok=True)
                    except OSError as error:
                        raise UserError(f"cannot create a checkpoint directory {folder}: "
                                        f"{error.strerror or error}; choose another --checkpoint-dir") from None
                    (folder / "layout.json").write_text(json.dumps({"tensors": self._layout}, indent=1))

    def adopt(self, step: int) -> None:
        """Hold ``step`` from its durable file, written by an earlier pass (read when needed)."""
        path = self.durable / f"state-{step:09d}.bin"
        if not path.is_file():
            raise UserError(f"the saved pass in {self.durable.parent} lacks checkpoint {step}; start a new run")
        if self._layout is None:
            self._layout = json.loads((self.durable / "layout.json").read_text())["tensors"]
        self._files[step] = path
        self.placement[step] = "disk"
        self._move(step, "disk", sum(e["nbytes"] for e in self._layout))

    def after_writes(self, fn) -> None:
        """Run ``fn()`` on the writer thread once every write queued so far is done (its
        errors are reported like a failed write)."""

        def guarded() -> None:
            if self._failed:  # a write before it failed: what fn would record is not on disk
                return
            try:
                fn()
            except BaseException as error:
                with self._lock:
                    self._error = error

        self._executor.submit(guarded)

    def wait(self) -> None:
        """Block until every queued write is done; raise if one failed."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_if_failed()

    def _to_device(self, step: int) -> TrainState:
        """A device copy of an offloaded state (run on the loader thread for prefetches)."""
        with self._lock:
            held = self._states.get(step)
            pending = self._pending.get(step)
        if held is None and pending is not None:
            pending.result()
        if held is not None:
            if self.device.type == "cpu":
                return held
            return TrainState.from_tensors(tuple(t.to(self.device, non_blocking=True) for t in held.tensors()), step)
        return self._read(step)

    def __getitem__(self, step: int) -> TrainState:
        self._raise_if_failed()
        tier = self._where[step]
        if tier == "device":
            return self._states[step]
        loading = self._loading.pop(step, None)
        if loading is not None:
            started = time.perf_counter()
            state = loading.result()
            self.stats["wait_seconds"] += time.perf_counter() - started
        else:
            state = self._to_device(step)
        self._raise_if_failed()
        self._drop_offloaded(step)
        self._states[step] = state  # resident until deleted
        self._move(step, "device", state.nbytes())
        self._prefetch_below(step)
        return state

    def _drop_offloaded(self, step: int) -> None:
        with self._lock:
            pending = self._pending.pop(step, None)
            path = self._files.pop(step, None)
            self._states.pop(step, None)
        if pending is not None:
            pending.result()
        if path is not None and not self.keep and step not in self.durable_steps:
            path.unlink(missing_ok=True)

    def _prefetch_below(self, step: int) -> None:
        """Start loading the next offloaded state down: the reverse pass reads them in that order."""
        below = [s for s, tier in self._where.items() if tier in ("host", "disk") and s < step]
        if not below or max(below) in self._loading:
            return
        target = max(below)
        self.stats["prefetched"] += 1
        if self._executor is None or self._where[target] == "host":
            future: Future = Future()  # host to device: a copy queued on the device's stream
            future.set_result(self._to_device(target))
            self._loading[target] = future
        else:
            self._loading[target] = self._executor.submit(self._to_device, target)

    def __delitem__(self, step: int) -> None:
        self._raise_if_failed()
        if step not in self._where:
            raise KeyError(step)
        loading = self._loading.pop(step, None)
        if loading is not None:
            loading.result()
        nbytes = self._bytes_of(step)
        self._drop_offloaded(step)
        self._move(step, None, nbytes)

    def _bytes_of(self, step: int) -> int:
        state = self._states.get(step)
        if state is not None:
            return state.nbytes()
        return sum(e["nbytes"] for e in self._layout)

    def __contains__(self, step) -> bool:
        return step in self._where

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def bytes_now(self) -> dict[str, int]:
        return dict(self._bytes)

    def close(self) -> None:
        """Finish pending writes and remove the directory (unless ``keep``)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._states.clear()
        self._pending.clear()
        self._loading.clear()
        if self.directory is not None and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


