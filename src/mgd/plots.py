"""Plot helpers: matplotlib is optional, and figures are written atomically."""

from __future__ import annotations

import io
import os

from mgd.io import atomic_write_bytes

__all__ = ["pyplot", "save_figure", "plot_progress"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_progress(history, path: str | os.PathLike, *, ylabel: str, title: str) -> None:
    """Validation objective per meta-step (from ``history.jsonl`` records), if matplotlib exists."""
    plt = pyplot()
    if plt is None or not history:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in history], [r["val_objective"] for r in history], marker="o", ms=3)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
