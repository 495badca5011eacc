"""Controlled corruption of a training pool, for experiments.

The ground-truth mask of what was corrupted is returned for diagnostics only (e.g. "how much
weight did MGD leave on noisy examples"); no method may read it.
"""

from __future__ import annotations

import numpy as np

from mgd.errors import UserError

__all__ = ["label_noise", "off_distribution", "near_duplicates"]


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


def _choose(n: int, rate: float, rng: np.random.Generator, exclude: np.ndarray | None, what: str) -> np.ndarray:
    """``round(rate · n)`` distinct indices outside ``exclude``, uniformly."""
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"{what} rate must be in [0, 1], got {rate}")
    free = np.flatnonzero(~exclude) if exclude is not None else np.arange(n)
    count = int(round(rate * n))
    if count > len(free):
        raise UserError(
            f"{what} rate {rate:g} asks for {count} examples but only {len(free)} are left uncorrupted; "
            "lower the corruption rates"
        )
    return np.sort(rng.choice(free, size=count, replace=False))


def off_distribution(
    x: np.ndarray,
    y: np.ndarray,
    rate: float,
    num_classes: int,
    *,
    seed: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace ``round(rate · N)`` examples by off-distribution inputs with random labels.

    ``protocols.md`` §4 (C2). Half of the chosen examples get their feature positions
    shuffled (a fresh permutation per example: pixel-permuted images, or MNIST-1D's
    ``shuffle_seq``); the other half are *inverted* (``lo + hi − x``) when every feature lies in
    ``[0, 1]`` (images), and otherwise get Gaussian noise of three times the features' standard
    deviation added (MNIST-1D's "much larger noise"). Every chosen example then gets a label
    drawn uniformly from all classes.

    Args:
        x, y: the pool (features of any shape, integer labels).
        rate: fraction of the pool (all of it, not of the free part) to replace.
        num_classes: number of classes.
        seed: the corruption is a pure function of the inputs and ``seed``.
        exclude: examples that must not be chosen (e.g. already corrupted).

    Returns:
        ``(x, y, corrupted)``: new arrays and the boolean mask of replaced examples.
    """
    rng = np.random.default_rng([seed, 0x0FD])
    n = len(y)
    chosen = _choose(n, rate, rng, exclude, "off-distribution")
    x = np.array(x, dtype=np.float64, copy=True)
    y = np.array(y, dtype=np.int64, copy=True)
    flat = x.reshape(n, -1)  # a view: writing to it writes x
    bounded = flat.min() >= 0.0 and flat.max() <= 1.0
    scale = 3.0 * float(flat.std())
    for j, i in enumerate(chosen):
        if j % 2 == 0:
            flat[i] = flat[i][rng.permutation(flat.shape[1])]
        elif bounded:
            flat[i] = 1.0 - flat[i]
        else:
            flat[i] = flat[i] + scale * rng.standard_normal(flat.shape[1])
    y[chosen] = rng.integers(0, num_classes, size=len(chosen))
    corrupted = np.zeros(n, dtype=bool)
    corrupted[chosen] = True
    return x, y, corrupted


def near_duplicates(
    x: np.ndarray,
    y: np.ndarray,
    rate: float,
    *,
    seed: int,
    copies_per_source: int = 20,
    noise: float = 0.01,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overwrite ``round(rate · N)`` examples with near-copies of a few other examples.

    ``protocols.md`` §4 (C2): about ``rate · N / copies_per_source`` *source* examples (at least
    one), drawn among the examples neither chosen nor excluded, are each copied about
    ``copies_per_source`` times, with their label and Gaussian noise of ``noise`` times the
    features' standard deviation. The pool size stays the same; each copy uses up a slot that a
    distinct example held, which is what makes duplicates costly under a budget.

    Returns:
        ``(x, y, corrupted)``; ``corrupted`` marks the copies (the sources stay clean).
    """
    rng = np.random.default_rng([seed, 0xD0B])
    n = len(y)
    chosen = _choose(n, rate, rng, exclude, "near-duplicate")
    x = np.array(x, dtype=np.float64, copy=True)
    y = np.array(y, dtype=np.int64, copy=True)
    corrupted = np.zeros(n, dtype=bool)
    if len(chosen) == 0:
        return x, y, corrupted
    taken = np.zeros(n, dtype=bool) if exclude is None else np.array(exclude, dtype=bool, copy=True)
    taken[chosen] = True
    free = np.flatnonzero(~taken)
    if len(free) == 0:
        raise UserError("near-duplicates need at least one uncorrupted example to copy; lower the rates")
    num_sources = min(len(free), max(1, int(round(len(chosen) / copies_per_source))))
    sources = rng.choice(free, size=num_sources, replace=False)
    flat = x.reshape(n, -1)
    scale = noise * float(flat.std())
    for j, i in enumerate(chosen):
        source = sources[j % num_sources]
        flat[i] = flat[source] + scale * rng.standard_normal(flat.shape[1])
        y[i] = y[source]
    corrupted[chosen] = True
    return x, y, corrupted
