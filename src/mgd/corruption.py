"""Controlled corruption of a training pool, for experiments.

The ground-truth mask of what was corrupted is returned for diagnostics only (e.g. "how much
weight did MGD leave on noisy examples"); no method may read it.
"""

from __future__ import annotations

import numpy as np

from mgd.errors import UserError

__all__ = ["label_noise"]


def label_noise(
    labels: np.ndarray, rate: float, num_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``round(rate · N)`` uniformly chosen examples a uniformly chosen *wrong* label.

    Args:
        labels: integer labels in ``[0, num_classes)``.
        rate: fraction of examples to corrupt, in ``[0, 1]``.
        num_classes: number of classes (at least 2).
        seed: the corruption is a pure function of ``(labels, rate, seed)``.

    Returns:
        ``(noisy_labels, corrupted)``, where ``corrupted`` is a boolean mask.
    """
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"label noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    rng = np.random.default_rng([seed, 0x1AB])
    n = len(labels)
    chosen = rng.choice(n, size=int(round(rate * n)), replace=False)
    noisy = np.array(labels, dtype=np.int64, copy=True)
    # adding 1..C-1 modulo C always lands on another class, uniformly
    noisy[chosen] = (noisy[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    corrupted = np.zeros(n, dtype=bool)
    corrupted[chosen] = True
    return noisy, corrupted
