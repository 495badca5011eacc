"""Honest evaluation: retrain from scratch on fresh seeds; mean and 95% confidence interval.

Final numbers never come from a crafting-time model: each method's metaparameters are
evaluated by training anew with evaluation seeds that no crafting step used, and the test
split is read only here.

The retraining runs are independent, so they can be spread over worker processes
(:func:`parallel_map`, ``--eval-workers`` in the CLI): each worker trains with the same thread
count as the parent, and every training run is deterministic, so the per-seed numbers are
identical to a sequential evaluation (the tests compare them exactly).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from torch import Tensor

from mgd.config import Problem, RunConfig, build_problem
from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.data import Dataset

__all__ = ["mean_ci", "retrain_and_evaluate", "summarize", "parallel_map"]


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


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parallel_map(
    fn: Callable[..., Any],
    tasks: Iterable[tuple],
    *,
    workers: int = 1,
    on_done: Callable[[], None] | None = None,
) -> list[Any]:
    """``[fn(*task) for task in tasks]``, over ``workers`` fresh processes when ``workers > 1``.

    Results keep the order of ``tasks``. Workers are started with ``spawn`` (no state
    inherited from the parent) and use the parent's torch thread count. ``fn`` and the tasks
    must be picklable (module-level functions, dataclasses, arrays, tensors).
    """
    import torch

    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(fn(*task))
            if on_done is not None:
                on_done()
        return results
    context = get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=context,
        initializer=_init_worker, initargs=(torch.get_num_threads(),),
    ) as pool:
        futures = [pool.submit(fn, *task) for task in tasks]
        results = []
        for future in futures:
            results.append(future.result())
            if on_done is not None:
                on_done()
    return results


def _retrain_once(config: RunConfig, dataset: Dataset, meta: Mapping[str, Tensor], seed: int) -> dict[str, float]:
    problem: Problem = build_problem(RunConfig(**{**config.to_dict(), "seed": seed}), dataset=dataset)
    final = problem.trainer.run(dict(meta))
    return {"seed": seed, **problem.evaluate(final)}


def retrain_and_evaluate(
    config: RunConfig,
    dataset: Dataset,
    meta: Mapping[str, Tensor],
    seeds: Sequence[int],
    *,
    workers: int = 1,
    collective: Collective = SINGLE_PROCESS,
) -> list[dict[str, float]]:
    """Train from scratch with each seed and metaparameters ``meta``; metrics per seed.

    ``workers > 1`` trains the seeds in that many processes (:func:`parallel_map`). Under
    ``torchrun`` (``collective``), rank ``r`` trains seeds ``r, r + W, ...`` on its own and
    every rank gets all results, in seed order.
    """
    mine = list(seeds)[collective.rank :: collective.world_size]
    results = parallel_map(_retrain_once, [(config, dataset, meta, seed) for seed in mine], workers=workers)
    if collective.world_size == 1:
        return results
    by_seed = {r["seed"]: r for part in collective.all_gather_object(results) for r in part}
    return [by_seed[seed] for seed in seeds]


def summarize(per_seed: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict]:
    """``mean_ci`` of each metric over seeds."""
    return {key: mean_ci([r[key] for r in per_seed]) for key in keys}


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping], key: str) -> dict[str, float]:
    """Mean and CI of ``a[key] - b[key]`` over seeds evaluated in the same order."""
    return mean_ci([x[key] - y[key] for x, y in zip(a, b)])
