"""Honest evaluation: retrain from scratch on fresh seeds; mean and 95% confidence interval.

Final numbers never come from a crafting-time model: each method's metaparameters are
evaluated by training anew with evaluation seeds that no crafting step used, and the test
split is read only here.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from torch import Tensor

from mgd.config import Problem, RunConfig, build_problem
from mgd.data import Dataset

__all__ = ["mean_ci", "retrain_and_evaluate", "summarize"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and the half-width of a Student-t confidence interval (``nan`` for one value)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "ci": math.nan, "n": n}
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci": half, "n": n}


def retrain_and_evaluate(
    config: RunConfig,
    dataset: Dataset,
    meta: Mapping[str, Tensor],
    seeds: Sequence[int],
) -> list[dict[str, float]]:
    """Train from scratch with each seed and metaparameters ``meta``; metrics per seed."""
    results = []
    for seed in seeds:
        problem: Problem = build_problem(RunConfig(**{**config.to_dict(), "seed": seed}), dataset=dataset)
        final = problem.trainer.run(dict(meta))
        results.append({"seed": seed, **problem.evaluate(final)})
    return results


def summarize(per_seed: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict]:
    """``mean_ci`` of each metric over seeds."""
    return {key: mean_ci([r[key] for r in per_seed]) for key in keys}


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping], key: str) -> dict[str, float]:
    """Mean and CI of ``a[key] - b[key]`` over seeds evaluated in the same order."""
    return mean_ci([x[key] - y[key] for x, y in zip(a, b)])
