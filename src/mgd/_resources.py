"""Peak-memory measurement (Linux): peak resident set size during a block of code."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

__all__ = ["PeakMemory", "peak_memory", "rss_bytes"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size, or ``None`` where ``/proc`` is unavailable."""
    return _status_kb("VmRSS")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """``baseline``: RSS before the block; ``peak``: high-water mark during it (bytes)."""

    baseline: int | None = None
    peak: int | None = None

    @property
    def extra_mb(self) -> float | None:
        """Peak RSS above the RSS at the start of the block, in MB (``None`` if unknown)."""
        if self.baseline is None or self.peak is None:
            return None
        return max(0, self.peak - self.baseline) / 2**20


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the peak RSS reached inside the ``with`` block, above its starting RSS."""
    result = PeakMemory()
    if _reset_peak():
        result.baseline = rss_bytes()
    try:
        yield result
    finally:
        if result.baseline is not None:
            result.peak = _status_kb("VmHWM")
