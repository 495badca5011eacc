"""Run directories: resolved config, history, atomically saved state, resume after a crash.

Layout of a run directory::

    run.json        what ran: format tag, command, resolved config, mgd version, start time
    history.jsonl   one JSON line per finished meta-step (appended, fsynced)
    state.npz       everything needed to continue, rewritten atomically after each step
    result.json, *.npz, *.png   final outputs, each written atomically

A run killed at any moment (even SIGKILL) loses at most the meta-step in progress: the state
file is replaced by an atomic rename, and on resume the history is cut back to the steps the
state covers. ``--resume DIR`` refuses a directory that is not an ``mgd`` run, is corrupt, or
was started with another command or config, and names the differing keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mgd._version import __version__
from mgd.errors import UserError
from mgd.io import atomic_write_bytes, load_npz, write_json, write_npz

__all__ = ["RunDirectory", "FORMAT"]

FORMAT = "mgd-run"
FORMAT_VERSION = 1
_META_KEY = "__meta__"


class RunDirectory:
    """A run directory (see the module docstring). Use :meth:`create` or :meth:`resume`."""

    def __init__(self, path: str | os.PathLike, info: dict):
        self.path = Path(path)
        self.info = info

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, *, command: str, config: Mapping[str, Any],
               overwrite: bool = False) -> "RunDirectory":
        """Start a new run in ``path``, which must not exist or be empty (``overwrite``: may hold
        an earlier run's outputs, which the new run replaces; ``mgd grad --out``)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file, not a directory; choose another --out")
        if not overwrite and path.exists() and any(path.iterdir()):
            raise UserError(
                f"{path} already exists and is not empty; continue that run with --resume {path} "
                "or choose another --out"
            )
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "command": command,
            "config": dict(config),
            "mgd_version": __version__,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "run.json", info)
        return cls(path, info)

    @classmethod
    def resume(cls, path: str | os.PathLike, *, command: str, config: Mapping[str, Any]) -> "RunDirectory":
        """Reopen ``path`` to continue it; the command and config must be the same."""
        path = Path(path)
        if not (path / "run.json").is_file():
            raise UserError(f"--resume {path}: not an mgd run directory (no run.json)")
        try:
            info = json.loads((path / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume {path}: run.json is corrupt ({exc}); start a new run with --out") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise UserError(f"--resume {path}: run.json is not an mgd run description")
        if info.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"--resume {path}: run format version {info.get('format_version')} is not "
                f"{FORMAT_VERSION}; resume it with the mgd version that started it ({info.get('mgd_version')})"
            )
        if info.get("command") != command:
            raise UserError(f"--resume {path}: this run was started by 'mgd {info.get('command')}', not 'mgd {command}'")
        saved = info.get("config", {})
        config = json.loads(json.dumps(dict(config)))  # the same JSON normalisation as saved
        differing = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differing[:4])
            raise UserError(
                f"--resume {path}: the config differs from the run's ({details}"
                f"{', ...' if len(differing) > 4 else ''}); rerun with the original flags or start a new run"
            )
        return cls(path, info)

    @classmethod
    def open(
        cls, out: str | os.PathLike, resume: str | os.PathLike | None, *, command: str, config: Mapping[str, Any]
    ) -> "RunDirectory":
        """``--resume DIR`` if given (:meth:`resume`), else a new run in ``--out`` (:meth:`create`)."""
        if resume:
            return cls.resume(resume, command=command, config=config)
        return cls.create(out, command=command, config=config)

    # ----------------------------------------------------------------- history
    @property
    def history_path(self) -> Path:
        return self.path / "history.jsonl"

    def history(self) -> list[dict]:
        """The recorded meta-steps (a torn last line from a crash is ignored)."""
        if not self.history_path.exists():
            return []
        records = []
        for line in self.history_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        return records

    def append_history(self, record: Mapping[str, Any]) -> None:
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_history(self, steps: int) -> None:
        """Keep the first ``steps`` records (those the saved state covers)."""
        kept = self.history()[:steps]
        atomic_write_bytes(self.history_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    # ----------------------------------------------------------------- state
    @property
    def state_path(self) -> Path:
        return self.path / "state.npz"

    def save_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Atomically replace the saved state (arrays plus JSON metadata, one file)."""
        encoded = np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode(), dtype=np.uint8)
        write_npz(self.state_path, {**arrays, _META_KEY: encoded})

    def load_state(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The saved state, or ``None`` if the run never finished a meta-step."""
        if not self.state_path.exists():
            return None
        arrays = load_npz(self.state_path, what=f"--resume {self.path}")
        if _META_KEY not in arrays:
            raise UserError(f"--resume {self.path}: state.npz is not an mgd state file")
        try:
            meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
        except ValueError as exc:
            raise UserError(f"--resume {self.path}: state.npz metadata is corrupt ({exc})") from None
        return arrays, meta

    # ----------------------------------------------------------------- outputs
    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_npz(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        write_npz(self.path / name, arrays)
