"""Safe, atomic file I/O: outputs are never half-written and user files are never unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mgd.errors import UserError

__all__ = ["atomic_write_bytes", "write_json", "write_npz", "load_npy", "load_npz"]

_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    The bytes go to a temporary file in the same directory, are flushed to disk (unless
    ``sync=False``: then the file survives the process being killed but not necessarily the
    machine crashing), and are then renamed over ``path`` (rename is atomic on POSIX within
    one file system).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}; choose another output directory") from None
    try:
        # mkstemp creates the file private (0600); give it the usual permissions instead.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):  # a full disk, a read-only folder: one clear line, nothing left
            raise UserError(f"cannot write {path}: {error.strerror or error}; free disk space or choose "
                            "another output directory") from None
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write a compressed ``.npz`` holding plain numeric arrays."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: np.asarray(a) for name, a in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _file_kind(path: Path) -> str:
    """``"npy"``, ``"npz"`` or ``"other"``, from the file's first bytes.

    ``np.load`` takes any file without the ``.npy`` or zip magic for a pickle, so a CSV would
    be reported as "pickled data"; looking first gives the user the right message.
    """
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(_NPY_MAGIC):
        return "npy"
    if magic.startswith(_ZIP_MAGICS):
        return "npz"
    return "other"


def load_npy(path: str | os.PathLike, *, what: str) -> np.ndarray:
    """Load a numeric ``.npy`` file without ever unpickling it.

    Args:
        path: the file.
        what: what the file is for, used in error messages (e.g. ``"--data-weights"``).

    Raises:
        UserError: the file is missing, not a ``.npy`` file, holds pickled objects or is not
            numeric.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    kind = _file_kind(path)
    if kind == "npz":
        raise UserError(f"{what}: {path} is an .npz archive; give a single-array .npy file")
    if kind != "npy":
        raise UserError(f"{what}: {path} is not a .npy file; save the array with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle; we refuse them
        raise UserError(
            f"{what}: {path} holds Python objects (pickled data), which mgd never loads; "
            "save a plain numeric array with numpy.save"
        ) from exc
    except Exception as exc:
        raise UserError(f"{what}: {path} is not a readable .npy file ({exc})") from exc
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise UserError(f"{what}: {path} has dtype {array.dtype}; expected a numeric array")
    return array


def load_npz(path: str | os.PathLike, *, what: str) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` archive without unpickling (see :func:`load_npy`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    kind = _file_kind(path)
    if kind == "npy":
        raise UserError(
            f"{what}: {path} is a single .npy array, not an .npz archive; save the arrays "
            "together with numpy.savez"
        )
    if kind != "npz":
        raise UserError(
            f"{what}: {path} is not an .npz archive (a zip of .npy arrays); save the arrays "
            "with numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise UserError(
            f"{what}: {path} holds Python objects (pickled data), which mgd never loads; "
            "save plain numeric arrays with numpy.savez"
        ) from exc
    except Exception as exc:
        raise UserError(f"{what}: {path} is not a readable .npz file ({exc})") from exc
