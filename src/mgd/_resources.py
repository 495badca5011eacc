"""Wall time and peak *extra* resident memory of a call or a block (Linux).

The method is the one of ``peers.md`` §2: reset the kernel's peak-RSS counter by writing
``5`` to ``/proc/self/clear_refs`` (``VmHWM`` then equals the current ``VmRSS``), run the
call, and report ``VmHWM`` afterwards minus ``VmRSS`` just before. Unlike ``ru_maxrss`` this
can be repeated inside one process.

Before the baseline is read, garbage is collected and glibc is asked to hand freed heap pages
back to the kernel (``malloc_trim``). Otherwise memory freed by earlier work (a warm-up, a
previous measurement) would stay resident, be reused by the call without raising RSS, and the
call's peak would be underestimated.

Only the measured call is timed; the bookkeeping around it is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["Measurement", "measure", "peak_memory", "rss_bytes", "peak_rss_bytes", "reset_peak_rss"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``None`` where there is no procfs)."""
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (``VmRSS``)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the last reset (``VmHWM``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set ``VmHWM`` to the current RSS; ``False`` if the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """Collect garbage and return glibc's free heap pages to the kernel (best effort)."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class Measurement:
    """One measured call.

    Attributes:
        seconds: wall time of the call.
        peak_extra_bytes: peak RSS during the call minus RSS just before it, or ``None``
            where the peak counter cannot be reset (not Linux, or no permission).
        rss_before_bytes: RSS just before the call (``None`` without procfs).
    """

    seconds: float
    peak_extra_bytes: int | None
    rss_before_bytes: int | None

    @property
    def peak_extra_mb(self) -> float | None:
        return None if self.peak_extra_bytes is None else self.peak_extra_bytes / MIB


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Measurement]:
    """Run ``fn(*args, **kwargs)``; return its result and a :class:`Measurement`."""
    release_free_memory()
    can_reset = reset_peak_rss()
    before = rss_bytes()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    extra = None
    if can_reset and before is not None and peak is not None:
        extra = max(0, peak - before)
    return result, Measurement(seconds, extra, before)


@dataclass
class PeakMemory:
    """Filled in by :func:`peak_memory` when its block ends."""

    extra_bytes: int | None = None

    @property
    def extra_mb(self) -> float | None:
        """Peak RSS above the RSS at the start of the block, in MB (``None`` if unknown)."""
        return None if self.extra_bytes is None else self.extra_bytes / MIB


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure, as :func:`measure` does, the peak extra RSS of a ``with`` block."""
    result = PeakMemory()
    release_free_memory()
    can_reset = reset_peak_rss()
    before = rss_bytes()
    try:
        yield result
    finally:
        peak = peak_rss_bytes()
        if can_reset and before is not None and peak is not None:
            result.extra_bytes = max(0, peak - before)
