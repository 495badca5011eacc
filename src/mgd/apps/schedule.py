r"""Learning-rate schedule search: MGD on log-LR knots against tuned baselines (``protocols.md`` §5).

Every method proposes one schedule, a :class:`~mgd.apps.protocol.Candidate` whose ``meta`` is
either per-step LR multipliers (``{"lr": m}``, the ``lr`` metaparameter, :math:`\eta_t =
\eta_\text{base} m_t`) or log-LR knots (``{"lr_knots": ℓ}``, :math:`\eta_t = \eta_\text{base}
\exp(\sum_j w_j(t) \ell_j)`, see :class:`~mgd.metaparams.LRKnots`). ``η_base`` is the run
config's ``lr``; every absolute LR below (starts, peaks, ``α0``) is divided by it. All choices
(grid winner, random-search winner, HD's ``α0 × β``, MGD's iterate) read only the validation
split; :func:`mgd.apps.protocol.evaluate` then retrains each candidate on fresh evaluation
seeds and is the only reader of the test split.

Methods:

* **MGD** (:func:`mgd_schedule`, ``method.md`` §6.3): ``K`` knots of the log-LR start flat at
  ``log(start_lr / η_base)``; Adam on the exact metagradient of the final validation
  cross-entropy (REPLAY), meta-LR ``0.1`` in log space, crafting seeds rotating across
  meta-steps, knots clamped to ``[log(lr_min/η_base), log(lr_max/η_base)]``. Each meta-step's
  value comes from one seed, so the iterate is chosen in two stages: the ``rescore_top`` best
  single-seed values are retrained on the selection seeds and the best mean validation wins.
* **Grid** (:func:`grid_search`): shapes (:data:`SHAPES`: constant; step ×0.1 at 50% and 75%;
  cosine to 0; 10% linear warm-up then linear decay; one-cycle 30% warm-up from peak/25, cosine
  to peak/25/1e4) × peaks (9 values, ×2 apart), mean validation over 3 seeds. If the best peak
  is on the edge of the peak list, the list grows by one ×2 step on that side (for every shape)
  until the best is interior (at most ``max_widen`` times; the report says if it stayed on
  the edge).
* **Random search** (:func:`random_search`): the same number of training runs as MGD used
  (training-run equivalents), spent on random schedules (:func:`parametric_schedule`: peak
  log-uniform over the grid's range, linear warm-up fraction, decay shape, final fraction),
  each scored like a grid point.
* **Hypergradient descent** (:func:`hypergradient_descent`; Baydin et al., *Online Learning
  Rate Adaptation with Hypergradient Descent*, ICLR 2018): before step ``t`` the LR moves by
  :math:`\alpha_t = \alpha_{t-1} + \beta\, \nabla f(\theta_t) \cdot d_{t-1}`, where ``d`` is the
  previous update direction (``θ_t = θ_{t-1} - α_{t-1} d_{t-1}``; the momentum buffer for SGD
  with momentum), i.e. a gradient step on :math:`\partial f(\theta_t)/\partial\alpha_{t-1} =
  -\nabla f(\theta_t)\cdot d_{t-1}`. ``α0 × β`` is tuned on validation. HD is online, so its LR
  trace depends on the seed; the candidate is the geometric mean of the chosen setting's
  traces over the selection seeds, retrained as a fixed schedule (reported in ``info`` with the
  online runs' validation numbers).

Cost: each training run counts 1; a meta-step counts the cost of one metagradient in training
runs, measured once by interleaving plain runs and metagradients so that a machine shared with
other jobs slows both alike (:func:`metagradient_cost_runs`); MGD's final iterate counts 1.

Example (tiny, runs in seconds):
    >>> from mgd.config import RunConfig
    >>> from mgd.data import load_dataset
    >>> from mgd.apps.schedule import run_schedule_search
    >>> config = RunConfig(dataset="digits", steps=20, width=16, num_knots=3).resolved()
    >>> report = run_schedule_search(
    ...     config, load_dataset("digits"), methods=("mgd", "grid"), meta_steps=2,
    ...     starts=("poor",), crafting_seeds=(0, 1, 2), eval_seeds=(100, 101),
    ...     peaks=(0.05, 0.1, 0.2, 0.4), shapes=("constant", "cosine"))
    >>> sorted(report["methods"])
    ['grid', 'mgd-poor', 'start-poor']
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mgd.apps.protocol import (
    Candidate,
    Cost,
    check_seeds,
    evaluate,
    evaluate_task,
    load_candidate,
    save_candidate,
    training_run_seconds,
)
from mgd.apps.tasks import TaskRuns
from mgd.config import RunConfig, build_problem
from mgd.data import Dataset
from mgd.descent import Box, MetaAdam, descend, state_from_arrays, state_to_arrays
from mgd.errors import UserError, check_choices
from mgd.metaparams import LRKnots
from mgd.training import TrainState

__all__ = [
    "ScheduleSource",
    "task_defaults",
    "SHAPES",
    "START_LRS",
    "METHODS",
    "DEFAULT_PEAKS",
    "shape_multipliers",
    "parametric_schedule",
    "knots_to_multipliers",
    "ValidationScorer",
    "reference_run_seconds",
    "metagradient_cost_runs",
    "grid_search",
    "random_search",
    "hd_run",
    "hypergradient_descent",
    "mgd_schedule",
    "mgd_at_budget",
    "run_schedule_search",
    "check_options",
    "absolute_schedule",
]

SHAPES = ("constant", "step", "cosine", "warmup_linear", "one_cycle")
START_LRS = {"poor": 0.01, "reasonable": 0.1}
METHODS = ("mgd", "grid", "random", "hd", "truncated")
#: Steps the truncated-unroll baseline differentiates through (protocols.md §7: 20-50).
TRUNCATION_HORIZON = 50
#: 9 peaks from 0.01 in ×2 steps (0.01 … 2.56), ``protocols.md`` §7.
DEFAULT_PEAKS = tuple(0.01 * 2**i for i in range(9))
SELECT_BY = ("loss", "accuracy")


# --------------------------------------------------------------------------- schedule shapes


def _cosine(start: float, end: float, progress: np.ndarray) -> np.ndarray:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * progress))


def shape_multipliers(shape: str, steps: int) -> np.ndarray:
    """A grid shape as per-step factors of the peak LR (peak 1), ``protocols.md`` §7.

    * ``constant``: 1;
    * ``step``: 1, then 0.1 from 50% of training, 0.01 from 75%;
    * ``cosine``: :math:`\\tfrac12(1 + \\cos(\\pi t / T))`, to 0;
    * ``warmup_linear``: linear warm-up over the first 10% of steps, then linear decay to 0;
    * ``one_cycle``: 30% cosine warm-up from 1/25, then cosine to 1/(25·1e4) (PyTorch's
      ``OneCycleLR`` defaults, without momentum cycling).
    """
    t = np.arange(steps, dtype=np.float64)
    if shape == "constant":
        return np.ones(steps)
    if shape == "step":
        return np.where(t < 0.5 * steps, 1.0, np.where(t < 0.75 * steps, 0.1, 0.01))
    if shape == "cosine":
        return _cosine(1.0, 0.0, t / steps)
    if shape == "warmup_linear":
        warm = max(1, round(0.1 * steps))
        return np.where(t < warm, (t + 1) / warm, (steps - t) / max(1, steps - warm))
    if shape == "one_cycle":
        warm = max(1, round(0.3 * steps))
        low = 1.0 / 25
        up = _cosine(low, 1.0, t / warm)
        down = _cosine(1.0, low / 1e4, (t - warm) / max(1, steps - 1 - warm))
        return np.where(t < warm, up, down)
    raise UserError(f"unknown schedule shape {shape!r}; choose from {', '.join(SHAPES)}")


DECAYS = ("constant", "step", "cosine", "linear", "exponential")


def parametric_schedule(steps: int, *, warmup: float, decay: str, final: float) -> np.ndarray:
    """Random search's family: linear warm-up over a fraction ``warmup`` of the steps, then a
    decay from 1 to ``final`` (``constant`` ignores ``final``; ``step`` drops to
    ``sqrt(final)`` at 50% and ``final`` at 75%; ``cosine``, ``linear``, ``exponential``)."""
    t = np.arange(steps, dtype=np.float64)
    warm = int(round(warmup * steps))
    rest = np.clip((t - warm) / max(1, steps - 1 - warm), 0.0, 1.0)
    if decay == "constant":
        after = np.ones(steps)
    elif decay == "step":
        after = np.where(t < 0.5 * steps, 1.0, np.where(t < 0.75 * steps, math.sqrt(final), final))
    elif decay == "cosine":
        after = _cosine(1.0, final, rest)
    elif decay == "linear":
        after = 1.0 + (final - 1.0) * rest
    elif decay == "exponential":
        after = final**rest
    else:
        raise UserError(f"unknown decay {decay!r}; choose from {', '.join(DECAYS)}")
    return np.where(t < warm, (t + 1) / max(1, warm), after)


def knots_to_multipliers(knots: np.ndarray, steps: int) -> np.ndarray:
    """The per-step multipliers ``exp(Σ_j w_j(t) ℓ_j)`` that log-LR knots stand for."""
    knots = np.asarray(knots, dtype=np.float64)
    out = np.empty(steps)
    for t in range(steps):
        j, alpha = LRKnots.hat_weights(t, steps, len(knots))
        out[t] = math.exp(knots[j] if alpha == 0.0 else (1 - alpha) * knots[j] + alpha * knots[j + 1])
    return out


def absolute_schedule(candidate: Candidate, config) -> np.ndarray:
    """The absolute LR per step that a candidate's ``lr`` and ``lr_knots`` give together
    (``config``: a :class:`RunConfig` or a :class:`ScheduleSource`)."""
    m = np.ones(config.steps)
    if "lr" in candidate.meta:
        m = m * np.asarray(candidate.meta["lr"], dtype=np.float64)
    if "lr_knots" in candidate.meta:
        m = m * knots_to_multipliers(candidate.meta["lr_knots"], config.steps)
    return config.lr * m


# --------------------------------------------------------------------------- validation scoring


def _seed_config(config: RunConfig, seed: int) -> RunConfig:
    return RunConfig(**{**config.to_dict(), "seed": seed})


class ScheduleSource:
    """The run whose schedule is searched: a built-in preset (``config`` and ``dataset``) or a
    user's task (:class:`~mgd.apps.tasks.TaskRuns`, whose run has the ``lr_knots`` kind).

    Every method below reads only this: the number of steps ``T``, the base LR ``η_base``, the
    number of knots, the optimizer's name, :meth:`make` (the run of a seed and its validation
    objective), :meth:`validate` (validation loss and accuracy of a final state, never test)
    and :meth:`evaluate` (the final retraining, the one reader of the test split).
    """

    def __init__(self, config: "RunConfig | TaskRuns", dataset: Dataset | None = None):
        self.config, self.dataset, self.runs = None, dataset, None
        self._made: dict[int, tuple] = {}
        if isinstance(config, RunConfig):
            self.config = config
            self.steps, self.lr, self.num_knots, self.optimizer = config.steps, config.lr, config.num_knots, config.optimizer
        else:
            self.runs = config
            run = config.task(0).run
            knots = run.metaparams.get("lr_knots")
            if knots is None or "lr" not in run.metaparams:
                raise UserError("a schedule search needs the lr and lr_knots metaparameters (the baselines "
                                "give per-step multipliers, MGD log-LR knots); add 'lr' and 'lr_knots' (or "
                                "mgd.LRKnots(num_knots=...)) to metaparams=[...] in the task function")
            self.steps, self.lr, self.num_knots = run.steps, run.lr, int(knots.num_knots)
            self.optimizer = type(run.optimizer).__name__.lower()

    def describe(self) -> dict:
        if self.config is not None:
            return self.config.to_dict()
        return {"task": self.runs.spec, "steps": self.steps, "lr": self.lr, "num_knots": self.num_knots,
                "optimizer": self.optimizer}

    def make(self, seed: int):
        """``(run, validation objective)`` for ``seed`` (built once per seed)."""
        if seed not in self._made:
            if self.runs is not None:
                self._made[seed] = self.runs.make(seed)
            else:
                problem = build_problem(_seed_config(self.config, seed), dataset=self.dataset)
                self._made[seed] = (problem.trainer, problem.val_objective())
        return self._made[seed]

    def validate(self, run, objective, state: TrainState) -> tuple[float, float]:
        """Validation loss (``inf`` if training diverged) and accuracy (``nan`` for a task
        without a ``val_accuracy`` metric). Never reads test."""
        if self.runs is not None:
            scores = self.runs.validation(run, objective, state)
            loss = scores["val_loss"]
            return (loss if math.isfinite(loss) else math.inf), scores.get("val_accuracy", math.nan)
        ds = self.dataset
        x_val = torch.as_tensor(ds.x_val, dtype=run.dtype, device=run.device)
        y_val = torch.as_tensor(ds.y_val, device=run.device)
        with torch.no_grad():
            logits = run.predict(state.params, state.buffers, x_val).double()
            loss = float(F.cross_entropy(logits, y_val))
            acc = float((logits.argmax(dim=1) == y_val).double().mean())
        return (loss if math.isfinite(loss) else math.inf), acc

    def evaluate(self, candidates, seeds, *, progress=None, workers: int = 1) -> dict:
        if self.runs is not None:
            return evaluate_task(self.runs, candidates, seeds, progress=progress, workers=workers)
        return evaluate(self.config, self.dataset, candidates, seeds, progress=progress, workers=workers)


def task_defaults(lr: float) -> dict:
    """The search's absolute LRs for a user's run, relative to its base LR ``η``: grid peaks
    ``η·2^{-4} … η·2^4``, starts ``η/10`` (poor) and ``η`` (reasonable), bounds ``[η/10^3,
    η·10^2]`` (the presets' 0.01/0.1 starts and 1e-4..10 bounds assume LRs near 0.1)."""
    return {"peaks": tuple(lr * 2.0**i for i in range(-4, 5)),
            "start_lrs": {"poor": lr / 10, "reasonable": lr},
            "lr_bounds": (lr * 1e-3, lr * 1e2)}


def _source(config, dataset) -> ScheduleSource:
    return config if isinstance(config, ScheduleSource) else ScheduleSource(config, dataset)


class ValidationScorer:
    """Train schedules on fixed selection seeds and read the validation split only.

    Counts the runs and seconds it spends, so methods can report their cost.
    """

    def __init__(self, config, dataset: Dataset | None, seeds: Sequence[int]):
        if not seeds:
            raise UserError("need at least one selection seed")
        self.source = _source(config, dataset)
        self.seeds = list(seeds)
        self.runs = 0
        self.seconds = 0.0

    def score(self, meta: Mapping[str, np.ndarray]) -> dict:
        """Mean validation loss and accuracy of ``meta`` over the selection seeds."""
        started = time.perf_counter()
        losses, accs = [], []
        for seed in self.seeds:
            run, objective = self.source.make(seed)
            values = {n: torch.as_tensor(np.asarray(v, dtype=np.float64)) for n, v in meta.items()}
            final = run.run(run.check_meta(values))
            loss, acc = self.source.validate(run, objective, final)
            losses.append(loss)
            accs.append(acc)
            self.runs += 1
        self.seconds += time.perf_counter() - started
        return {"val_loss": float(np.mean(losses)), "val_accuracy": float(np.mean(accs))}


def _badness(score: Mapping[str, float], select_by: str) -> float:
    """What selection minimises: validation loss, or minus validation accuracy."""
    value = score["val_loss"] if select_by == "loss" else -score["val_accuracy"]
    return value if math.isfinite(value) else math.inf


def _check_select_by(select_by: str) -> None:
    if select_by not in SELECT_BY:
        raise UserError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")


def reference_run_seconds(config, dataset: Dataset | None, *, repeats: int = 3) -> float:
    """Seconds of one plain training run (median of ``repeats`` after one warm-up run)."""
    source = _source(config, dataset)
    run, _ = source.make(source.config.seed if source.config is not None else 0)
    return training_run_seconds(run, repeats=repeats)


def metagradient_cost_runs(
    config, dataset: Dataset | None, *, k: int | None = None, horizon: int | None = None, repeats: int = 2
) -> float:
    """One ``lr_knots`` metagradient's cost in training runs: median seconds of metagradients
    over median seconds of plain runs, timed alternately (run, metagradient, run, ...)."""
    from mgd.replay import metagradient

    source = _source(config, dataset)
    trainer, objective = source.make(source.config.seed if source.config is not None else 0)
    trainer.run()  # warm-up
    runs, metas = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.run()
        runs.append(time.perf_counter() - started)
        started = time.perf_counter()
        metagradient(trainer, objective, trainer.default_meta(), wrt=["lr_knots"],
                     k=source.steps if k is None else k, horizon=horizon)
        metas.append(time.perf_counter() - started)
    started = time.perf_counter()
    trainer.run()
    runs.append(time.perf_counter() - started)
    return float(np.median(metas) / np.median(runs))


# --------------------------------------------------------------------------- grid and random search


def _grid_point(shape: str, peak: float, config) -> dict:
    return {"lr": peak * shape_multipliers(shape, config.steps) / config.lr}


def grid_search(
    config,
    dataset: Dataset | None,
    *,
    shapes: Sequence[str] = SHAPES,
    peaks: Sequence[float] = DEFAULT_PEAKS,
    seeds: Sequence[int] = (0, 1, 2),
    select_by: str = "loss",
    max_widen: int = 4,
    scorer=None,
    progress: Callable[[str, int], None] | None = None,
) -> Candidate:
    """Shapes × peaks, mean validation over ``seeds``; widen the peaks while the best is on an edge.

    ``scorer`` (default: a :class:`ValidationScorer` on ``seeds``) may be any object with
    ``score(meta) -> {"val_loss", "val_accuracy"}``, ``runs`` and ``seconds`` (tests use one
    with a known optimum).

    Returns:
        The ``grid`` candidate (``meta={"lr": multipliers}``); ``info`` holds the whole table,
        the final peak list, the number of widenings and whether the best stayed on an edge.
    """
    _check_select_by(select_by)
    if not shapes:
        raise UserError("the grid needs at least one shape")
    for shape in shapes:
        shape_multipliers(shape, 1)  # validates the name
    peaks = sorted(float(p) for p in peaks)
    if len(peaks) < 3 or peaks[0] <= 0:
        raise UserError("the grid needs at least 3 positive peak learning rates")
    if scorer is None:
        config = _source(config, dataset)
        scorer = ValidationScorer(config, None, seeds)
    table: dict[tuple[str, float], dict] = {}

    def fill() -> None:
        for shape in shapes:
            for peak in peaks:
                if (shape, peak) not in table:
                    table[(shape, peak)] = scorer.score(_grid_point(shape, peak, config))
                    if progress is not None:
                        progress("grid", 1)

    fill()
    widened = 0
    while True:
        best_shape, best_peak = min(table, key=lambda key: _badness(table[key], select_by))
        on_low, on_high = best_peak == peaks[0], best_peak == peaks[-1]
        if not (on_low or on_high) or widened >= max_widen:
            break
        # Grow on the side the best sits on: a grid whose best is on its edge is untuned.
        peaks = [peaks[0] / 2] + peaks if on_low else peaks + [peaks[-1] * 2]
        widened += 1
        fill()
    meta = _grid_point(best_shape, best_peak, config)
    return Candidate(
        name="grid",
        meta=meta,
        cost=Cost(seconds=scorer.seconds, training_runs=float(scorer.runs)),
        info={
            "shape": best_shape,
            "peak": best_peak,
            "peaks": peaks,
            "widened": widened,
            "best_on_edge": best_peak in (peaks[0], peaks[-1]),
            "selection_seeds": list(seeds),
            "best_val": table[(best_shape, best_peak)],
            "table": [{"shape": s, "peak": p, **v} for (s, p), v in sorted(table.items())],
        },
    )


def random_search(
    config,
    dataset: Dataset | None,
    *,
    runs: int,
    seeds: Sequence[int] = (0, 1, 2),
    peak_range: tuple[float, float] = (DEFAULT_PEAKS[0], DEFAULT_PEAKS[-1]),
    select_by: str = "loss",
    search_seed: int = 0,
    scorer=None,
    progress: Callable[[str, int], None] | None = None,
) -> Candidate:
    """``runs // len(seeds)`` random schedules (:func:`parametric_schedule`), best mean validation.

    Each draw: peak log-uniform in ``peak_range``, warm-up fraction uniform in [0, 0.3], decay
    uniform over :data:`DECAYS`, final fraction log-uniform in [1e-4, 1]. ``scorer`` as in
    :func:`grid_search`.
    """
    _check_select_by(select_by)
    draws = runs // max(1, len(seeds))
    if draws < 1:
        raise UserError(f"random search needs at least {len(seeds)} runs (one schedule on each seed), got {runs}")
    lo, hi = peak_range
    if not 0 < lo < hi:
        raise UserError(f"bad peak range {peak_range}")
    rng = np.random.default_rng(search_seed)
    if scorer is None:
        config = _source(config, dataset)
        scorer = ValidationScorer(config, None, seeds)
    best = None
    for _ in range(draws):
        params = {
            "peak": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            "warmup": float(rng.uniform(0.0, 0.3)),
            "decay": str(rng.choice(DECAYS)),
            "final": float(math.exp(rng.uniform(math.log(1e-4), 0.0))),
        }
        shape = parametric_schedule(config.steps, warmup=params["warmup"], decay=params["decay"], final=params["final"])
        meta = {"lr": params["peak"] * shape / config.lr}
        score = scorer.score(meta)
        if best is None or _badness(score, select_by) < _badness(best[1], select_by):
            best = (params, score, meta)
        if progress is not None:
            progress("random", len(seeds))
    params, score, meta = best
    return Candidate(
        name="random",
        meta=meta,
        cost=Cost(seconds=scorer.seconds, training_runs=float(scorer.runs)),
        info={"best": params, "best_val": score, "draws": draws, "selection_seeds": list(seeds)},
    )


# --------------------------------------------------------------------------- hypergradient descent


def hd_run(trainer, *, alpha0: float, beta: float, lr_floor: float = 1e-6) -> tuple[TrainState, np.ndarray, bool]:
    """One SGD-HD training run (see the module docstring); returns state, LR trace, finished.

    ``α`` is the absolute LR; it is kept ``≥ lr_floor`` (Baydin et al. do not clamp, but a
    negative LR would ascend). Warm-up in the run config scales ``α`` as it scales ``η_base``.
    The gradient in the hypergradient is the one the optimizer follows (with coupled weight
    decay).
    """
    meta = trainer.check_meta({})
    state = trainer.init_state()
    alpha, direction, trace = float(alpha0), None, []
    for t in range(trainer.steps):
        with torch.no_grad():
            inputs = trainer.step_inputs(t, trainer.local_meta(meta, t))
        # The run's own gradient (micro-batches, ranks), then its update at SGD-HD's LR.
        grad, new_buffers, _ = trainer.gradient(state, inputs)
        with torch.no_grad():
            weight_decay = float(inputs.weight_decay)
            full_grad = grad + weight_decay * state.params if weight_decay else grad
            if direction is not None:
                alpha = max(alpha + beta * float(full_grad @ direction), lr_floor)
            if not math.isfinite(alpha):
                return state, np.asarray(trace), False
            lr = alpha * float(inputs.lr) / trainer.lr  # warm-up / fixed multipliers
        new_state = trainer.update(state, grad, replace(inputs, lr=torch.tensor(lr, dtype=trainer.dtype)), new_buffers)
        direction = (state.params - new_state.params) / lr
        trace.append(alpha)
        state = new_state
        if not torch.isfinite(state.params).all():
            return state, np.asarray(trace), False
    return state, np.asarray(trace), True


def hypergradient_descent(
    config,
    dataset: Dataset | None,
    *,
    alpha0s: Sequence[float] = (0.01, 0.1),
    betas: Sequence[float] = (1e-4, 1e-3, 1e-2),
    seeds: Sequence[int] = (0, 1, 2),
    select_by: str = "loss",
    progress: Callable[[str, int], None] | None = None,
) -> Candidate:
    """SGD-HD with ``α0 × β`` tuned on mean validation over ``seeds``.

    Returns:
        The ``hd`` candidate: ``meta={"lr": geometric mean of the chosen setting's traces /
        η_base}``; ``info`` has the table and the online runs' mean validation numbers.
    """
    _check_select_by(select_by)
    started = time.perf_counter()
    source = _source(config, dataset)
    problems = [source.make(s) for s in seeds]
    table, traces = [], {}
    for alpha0 in alpha0s:
        for beta in betas:
            losses, accs, runs = [], [], []
            for run, objective in problems:
                state, trace, ok = hd_run(run, alpha0=alpha0, beta=beta)
                loss, acc = source.validate(run, objective, state) if ok else (math.inf, 0.0)
                losses.append(loss)
                accs.append(acc)
                runs.append(trace if ok else None)
                if progress is not None:
                    progress("hd", 1)
            row = {"alpha0": alpha0, "beta": beta, "val_loss": float(np.mean(losses)),
                   "val_accuracy": float(np.mean(accs))}
            table.append(row)
            traces[(alpha0, beta)] = runs
    finite = [r for r in table if all(t is not None for t in traces[(r["alpha0"], r["beta"])])]
    if not finite:
        raise UserError("every hypergradient-descent setting diverged; lower the alpha0 or beta values")
    best = min(finite, key=lambda r: _badness(r, select_by))
    chosen = traces[(best["alpha0"], best["beta"])]
    lrs = np.exp(np.mean(np.log(np.stack(chosen)), axis=0))
    return Candidate(
        name="hd",
        meta={"lr": lrs / source.lr},
        cost=Cost(seconds=time.perf_counter() - started, training_runs=float(len(table) * len(problems))),
        info={"alpha0": best["alpha0"], "beta": best["beta"], "online_val": {k: best[k] for k in ("val_loss", "val_accuracy")},
              "table": table, "selection_seeds": list(seeds),
              "note": "fixed schedule = geometric mean of the online LR traces over the selection seeds"},
    )


# --------------------------------------------------------------------------- MGD


def _rescore(
    values: Sequence[float], iterates: Sequence[np.ndarray], upto: int, scorer: ValidationScorer,
    top: int, select_by: str,
) -> tuple[int, list[dict]]:
    """Among iterates ``0..upto``, retrain the ``top`` best single-seed values on the selection
    seeds; return the index with the best mean validation and the rescoring table."""
    order = sorted(range(upto + 1), key=lambda i: values[i] if math.isfinite(values[i]) else math.inf)
    rows = []
    for i in order[: max(1, top)]:
        rows.append({"step": i, "single_seed_val_objective": values[i],
                     **scorer.score({"lr_knots": iterates[i]})})
    best = min(rows, key=lambda r: _badness(r, select_by))
    return best["step"], rows


def mgd_schedule(
    config,
    dataset: Dataset | None,
    *,
    start_lr: float,
    name: str = "mgd",
    meta_steps: int = 20,
    meta_lr: float = 0.3,
    crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    selection_seeds: Sequence[int] = (0, 1, 2),
    rescore_top: int = 3,
    select_by: str = "loss",
    lr_bounds: tuple[float, float] = (1e-4, 10.0),
    k: int | None = None,
    metagradient_runs: float | None = None,
    horizon: int | None = None,
    kind: str = "mgd",
    store=None,
    progress: Callable[[str, int], None] | None = None,
) -> Candidate:
    """Adam on the metagradient of the final validation CE w.r.t. ``K = config.num_knots`` knots.

    Args:
        start_lr: the flat starting LR (absolute; 0.01 "poor", 0.1 "reasonable").
        meta_lr: Adam's step in log-LR space.
        k: REPLAY branching factor (default: store every state; cheap at this size).
        metagradient_runs: the cost of one metagradient in training runs (default: measured
            with :func:`metagradient_cost_runs`).
        horizon: differentiate only the last ``horizon`` training steps (the truncated-unroll
            baseline, reported with ``kind="baseline"``); default: the whole run.
        store: optional :class:`~mgd.runs.RunDirectory` to save the descent after each
            meta-step and resume from it.

    Returns:
        A candidate with ``meta={"lr_knots": knots}``; ``info`` holds the per-step validation
        objective, seconds, iterates (for :func:`mgd_at_budget`), the rescoring table and the
        chosen step.
    """
    _check_select_by(select_by)
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise UserError(f"start LR must be > 0, got {start_lr}")
    lo, hi = lr_bounds
    if not 0 < lo < start_lr < hi:
        raise UserError(f"start LR {start_lr} must lie inside the LR bounds {lr_bounds}")
    config = _source(config, dataset)
    if metagradient_runs is None:
        metagradient_runs = metagradient_cost_runs(config, None, k=k, horizon=horizon)
    steps_k = config.steps if k is None else k
    make_trainer = config.make
    dtype = make_trainer(crafting_seeds[0])[0].dtype
    z0 = {"lr_knots": torch.full((config.num_knots,), math.log(start_lr / config.lr), dtype=dtype)}
    box = Box(math.log(lo / config.lr), math.log(hi / config.lr))
    records: list[dict] = []
    state = None
    prefix = f"{name}_state"
    if store is not None and (store.path / f"{prefix}.npz").exists():
        from mgd.io import load_npz

        arrays = load_npz(store.path / f"{prefix}.npz", what=f"resume {store.path}")
        saved = json.loads((store.path / f"{prefix}.json").read_text())
        state = state_from_arrays(arrays, saved["state"], like=z0)
        records = saved["records"][: state.step]
        if progress is not None:
            progress("mgd", state.step)

    def on_step(record, new_state) -> None:
        records.append({**record.to_dict(), "knots": record.iterate["lr_knots"].cpu().numpy().tolist()})
        if store is not None:
            arrays, meta = state_to_arrays(new_state)
            store.write_npz(f"{prefix}.npz", arrays)
            store.write_json(f"{prefix}.json", {"state": meta, "records": records})

    state = descend(
        make_trainer, z0, optimizer=MetaAdam(meta_lr), projections={"lr_knots": box},
        steps=meta_steps, seeds=list(crafting_seeds), k=steps_k, horizon=horizon, state=state,
        on_step=on_step, progress=progress,
    )
    values = [r["val_objective"] for r in records]
    iterates = [np.asarray(r["knots"]) for r in records]
    seconds = [r["seconds"] for r in records]
    scorer = ValidationScorer(config, None, selection_seeds)
    chosen, rows = _rescore(values, iterates, meta_steps, scorer, rescore_top, select_by)
    mgd_seconds = float(np.sum(seconds))
    return Candidate(
        name=name,
        meta={"lr_knots": iterates[chosen]},
        cost=Cost(seconds=mgd_seconds + scorer.seconds,
                  training_runs=meta_steps * metagradient_runs + 1 + scorer.runs),
        kind=kind,
        info={
            "start_lr": start_lr, "meta_lr": meta_lr, "meta_steps": meta_steps, "horizon": horizon,
            "crafting_seeds": list(crafting_seeds), "selection_seeds": list(selection_seeds),
            "chosen_step": chosen, "rescoring": rows, "val_objective_by_step": values,
            "seconds_by_step": seconds, "iterates": [it.tolist() for it in iterates],
            "metagradient_runs": metagradient_runs, "rescore_top": rescore_top, "select_by": select_by,
        },
    )


def mgd_at_budget(
    candidate: Candidate, config, dataset: Dataset | None, *, budget_runs: float,
    name: str, selection_seeds: Sequence[int] = (0, 1, 2), progress=None,
) -> Candidate | None:
    """The MGD run stopped early at the most meta-steps that fit in ``budget_runs``.

    Descent is deterministic, so the first ``N`` iterates of a longer run are exactly those of
    a run with ``meta_steps = N``; the iterate is chosen among them as :func:`mgd_schedule`
    would (rescoring on the selection seeds), so no later information is used. ``None`` if the
    full run already fits or not even one meta-step does.
    """
    info = candidate.info
    ratio, top = info["metagradient_runs"], info["rescore_top"]
    rescoring = top * len(selection_seeds)
    runs = [i * ratio + 1 for i in range(info["meta_steps"] + 1)]  # cost of iterates 0..i
    fits = [i for i in range(1, len(runs)) if runs[i] + rescoring <= budget_runs]
    if not fits or fits[-1] >= info["meta_steps"]:
        return None
    upto = fits[-1]
    scorer = ValidationScorer(_source(config, dataset), None, selection_seeds)
    iterates = [np.asarray(it) for it in info["iterates"]]
    chosen, rows = _rescore(info["val_objective_by_step"], iterates, upto, scorer, top, info["select_by"])
    return Candidate(
        name=name,
        meta={"lr_knots": iterates[chosen]},
        cost=Cost(seconds=float(np.sum(info["seconds_by_step"][: upto + 1])) + scorer.seconds,
                  training_runs=float(runs[upto]) + scorer.runs),
        kind="mgd",
        info={"meta_steps": upto, "chosen_step": chosen, "rescoring": rows, "budget_runs": budget_runs,
              "start_lr": info["start_lr"]},
    )


# --------------------------------------------------------------------------- the whole study


def _save_candidate(store, candidate: Candidate) -> None:
    if store is not None:
        save_candidate(store, candidate)


def _load_candidate(store, name: str) -> Candidate | None:
    return None if store is None else load_candidate(store, name)


def _parse_list(values: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    return check_choices(values, allowed, f"--{what}")


def check_options(
    config, *, methods: Sequence[str], starts: Sequence[str], meta_steps: int,
    crafting_seeds: Sequence[int], eval_seeds: Sequence[int], selection_seeds: int, select_by: str,
) -> tuple[list[str], list[str]]:
    """Reject bad options up front (before any run directory or training); returns the lists."""
    methods = _parse_list(methods, METHODS, "methods")
    starts = _parse_list(starts, ("poor", "reasonable"), "starts") if "mgd" in methods else list(starts)
    _check_select_by(select_by)
    if meta_steps < 1:
        raise UserError(f"meta-steps must be >= 1, got {meta_steps}")
    if not crafting_seeds:
        raise UserError("need at least one crafting seed")
    check_seeds(crafting_seeds, eval_seeds)
    if not 1 <= selection_seeds <= len(crafting_seeds):
        raise UserError(f"selection seeds must be between 1 and the {len(crafting_seeds)} crafting seeds")
    if config.optimizer != "sgd" and "hd" in methods:
        raise UserError("the hd baseline implements SGD-HD; use SGD (--optimizer sgd) or drop hd from --methods")
    return methods, starts


def run_schedule_search(
    config,
    dataset: Dataset | None,
    *,
    methods: Sequence[str] = METHODS,
    meta_steps: int = 20,
    starts: Sequence[str] = ("poor", "reasonable"),
    crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_seeds: Sequence[int] = tuple(range(100, 110)),
    selection_seeds: int = 3,
    meta_lr: float = 0.3,
    select_by: str = "loss",
    peaks: Sequence[float] = DEFAULT_PEAKS,
    shapes: Sequence[str] = SHAPES,
    random_runs: int | None = None,
    k: int | None = None,
    start_lrs: Mapping[str, float] = START_LRS,
    lr_bounds: tuple[float, float] = (1e-4, 10.0),
    store=None,
    progress: Callable[[str, int], None] | None = None,
    eval_workers: int = 1,
) -> dict:
    """Run the chosen methods, evaluate them all with :func:`~mgd.apps.protocol.evaluate`.

    ``config`` is a :class:`RunConfig` (with ``dataset``) or a user's task
    (:class:`~mgd.apps.tasks.TaskRuns`, ``dataset=None``; evaluated by
    :func:`~mgd.apps.protocol.evaluate_task`). ``start_lrs`` are MGD's constant starting LRs
    and ``lr_bounds`` its clamp, both absolute.

    ``eval_workers``: processes for the evaluation's retraining runs (same results).

    Selection (grid, random search, HD, MGD's iterate) uses the first ``selection_seeds``
    crafting seeds; MGD rotates over all crafting seeds. The constant starting schedules are
    evaluated as references. Random search gets as many runs as one MGD start cost (or
    ``random_runs``; default without MGD: the grid's initial size). When both MGD and the grid
    ran, ``mgd-poor@grid-budget`` is MGD from the poor start stopped at the grid's cost.

    Returns:
        :func:`~mgd.apps.protocol.evaluate`'s report plus ``"schedule"``: the absolute LR per
        step of every candidate, MGD progress, the grid table, and ``"bar"``: for each MGD
        candidate, whether its mean test accuracy is within the best grid schedule's CI and
        whether it cost fewer training-run equivalents (reporting only; nothing is chosen on it).
    """
    config = _source(config, dataset)
    methods, starts = check_options(config, methods=methods, starts=starts, meta_steps=meta_steps,
                                    crafting_seeds=crafting_seeds, eval_seeds=eval_seeds,
                                    selection_seeds=selection_seeds, select_by=select_by)
    chosen_seeds = list(crafting_seeds)[:selection_seeds]
    run_seconds = reference_run_seconds(config, None)
    metagradient_runs = metagradient_cost_runs(config, None, k=k) if "mgd" in methods else None
    candidates: list[Candidate] = []

    def once(name: str, make: Callable[[], Candidate | None]) -> Candidate | None:
        candidate = _load_candidate(store, name)
        if candidate is None:
            candidate = make()
            if candidate is not None:
                _save_candidate(store, candidate)
        return candidate

    mgd = {}
    if "mgd" in methods:
        for start in starts:
            lr0 = start_lrs[start]
            candidates.append(Candidate(
                name=f"start-{start}", meta={"lr_knots": np.full(config.num_knots, math.log(lr0 / config.lr))},
                kind="reference", info={"constant_lr": lr0}))
            mgd[start] = once(f"mgd-{start}", lambda start=start, lr0=lr0: mgd_schedule(
                config, dataset, start_lr=lr0, name=f"mgd-{start}", meta_steps=meta_steps, meta_lr=meta_lr,
                crafting_seeds=crafting_seeds, selection_seeds=chosen_seeds, select_by=select_by, k=k,
                lr_bounds=lr_bounds, metagradient_runs=metagradient_runs, store=store, progress=progress))
            candidates.append(mgd[start])
    grid = None
    if "grid" in methods:
        grid = once("grid", lambda: grid_search(
            config, dataset, shapes=shapes, peaks=peaks, seeds=chosen_seeds, select_by=select_by, progress=progress))
        candidates.append(grid)
    if "random" in methods:
        if random_runs is None:
            random_runs = (int(round(np.mean([c.cost.training_runs for c in mgd.values()]))) if mgd
                           else len(shapes) * len(peaks) * len(chosen_seeds))
        candidates.append(once("random", lambda: random_search(
            config, dataset, runs=random_runs, seeds=chosen_seeds, peak_range=(min(peaks), max(peaks)),
            select_by=select_by, progress=progress)))
    if "hd" in methods:
        candidates.append(once("hd", lambda: hypergradient_descent(
            config, dataset, seeds=chosen_seeds, select_by=select_by, progress=progress)))
    if "truncated" in methods:
        # MGD's own code from the poor start, differentiating only the last steps: what the
        # full horizon adds (protocols.md §7).
        candidates.append(once("truncated-poor", lambda: mgd_schedule(
            config, dataset, start_lr=start_lrs["poor"], name="truncated-poor", meta_steps=meta_steps,
            meta_lr=meta_lr, crafting_seeds=crafting_seeds, selection_seeds=chosen_seeds, select_by=select_by,
            k=k, lr_bounds=lr_bounds, horizon=min(TRUNCATION_HORIZON, config.steps), kind="baseline", store=store, progress=progress)))
    if grid is not None and "poor" in mgd:
        budget = mgd_at_budget(mgd["poor"], config, dataset, budget_runs=grid.cost.training_runs,
                               name="mgd-poor@grid-budget", selection_seeds=chosen_seeds)
        if budget is not None:
            _save_candidate(store, budget)
            candidates.append(budget)

    report = config.evaluate(candidates, eval_seeds, progress=progress, workers=eval_workers)
    report["schedule"] = {
        "lr_by_step": {c.name: absolute_schedule(c, config).tolist() for c in candidates},
        "mgd_progress": {s: c.info["val_objective_by_step"] for s, c in mgd.items()},
        "mgd_chosen_step": {s: c.info["chosen_step"] for s, c in mgd.items()},
        "grid": grid.info if grid is not None else None,
        "select_by": select_by,
        "selection_seeds": chosen_seeds,
        "crafting_seeds": list(crafting_seeds),
        "run_seconds": run_seconds,
        "metagradient_runs": metagradient_runs,
        "config": config.describe(),
    }
    report["bar"] = _bar(report, grid is not None)
    return report


def _bar(report: dict, has_grid: bool) -> dict:
    """The issue's bar, read from the evaluation: MGD within the grid's CI, at lower cost.

    For a preset the metric is test accuracy (and the paired test-loss difference is given
    too); for a task, its first test metric, higher-is-better when its name contains ``acc``
    and lower-is-better otherwise (a loss).
    """
    if not has_grid:
        return {}
    from mgd.evaluation import mean_ci

    methods = report["methods"]
    grid = methods["grid"]
    tests = report.get("keys", {}).get("test", ["test_accuracy"])
    key = "test_accuracy" if "test_accuracy" in tests else tests[0]
    higher = "acc" in key
    out = {}
    for name, m in methods.items():
        if m["kind"] != "mgd":
            continue
        diff = [a[key] - b[key] for a, b in zip(m["per_seed"], grid["per_seed"])]
        g = grid[key]
        within = m[key]["mean"] >= g["mean"] - g["ci"] if higher else m[key]["mean"] <= g["mean"] + g["ci"]
        out[name] = {"metric": key, "within_grid_ci": bool(within),
                     "fewer_runs_than_grid": bool(m["cost"]["training_runs"] < grid["cost"]["training_runs"]),
                     "paired_diff_vs_grid": mean_ci(diff)}
        if key == "test_accuracy":  # the names the results pages and the robustness protocol read
            out[name]["paired_acc_diff_vs_grid"] = out[name]["paired_diff_vs_grid"]
            if "test_loss" in m:
                out[name]["paired_loss_diff_vs_grid"] = mean_ci(
                    [a["test_loss"] - b["test_loss"] for a, b in zip(m["per_seed"], grid["per_seed"])])
    return out


def bar_markdown(report: dict) -> str:
    """The bar section and the chosen schedules, for ``report.md``."""
    lines = []
    bar = report.get("bar") or {}
    if bar and "paired_loss_diff_vs_grid" in next(iter(bar.values())):
        lines += ["", "### MGD vs the best grid schedule (paired over evaluation seeds)", "",
                  "| MGD candidate | Δ test acc (pts) | Δ test loss | within grid CI | fewer runs than grid |",
                  "|---|---|---|---|---|"]
        for name, b in bar.items():
            a, l = b["paired_acc_diff_vs_grid"], b["paired_loss_diff_vs_grid"]
            lines.append(f"| {name} | {100 * a['mean']:+.2f} ± {100 * a['ci']:.2f} | {l['mean']:+.4f} ± {l['ci']:.4f} "
                         f"| {'yes' if b['within_grid_ci'] else 'no'} | {'yes' if b['fewer_runs_than_grid'] else 'no'} |")
    elif bar:
        metric = next(iter(bar.values()))["metric"]
        lines += ["", f"### MGD vs the best grid schedule on {metric} (paired over evaluation seeds)", "",
                  f"| MGD candidate | Δ {metric} | within grid CI | fewer runs than grid |", "|---|---|---|---|"]
        for name, b in bar.items():
            d = b["paired_diff_vs_grid"]
            lines.append(f"| {name} | {d['mean']:+.4f} ± {d['ci']:.4f} | {'yes' if b['within_grid_ci'] else 'no'} "
                         f"| {'yes' if b['fewer_runs_than_grid'] else 'no'} |")
    s = report["schedule"]
    grid = s.get("grid")
    if grid:
        lines += ["", f"Grid winner (by mean val {s['select_by']} over seeds {grid['selection_seeds']}): "
                  f"{grid['shape']} at peak {grid['peak']:g}; peaks {', '.join(f'{p:g}' for p in grid['peaks'])}"
                  f" (widened {grid['widened']}x; best on edge: {'yes' if grid['best_on_edge'] else 'no'})."]
    for name, m in report["methods"].items():
        info = m["info"]
        if "chosen_step" in info:
            lines.append(f"{name}: iterate of meta-step {info['chosen_step']} of {info['meta_steps']} chosen on validation.")
        if name == "hd":
            lines.append(f"hd: alpha0 {info['alpha0']:g}, beta {info['beta']:g} (online mean val loss "
                         f"{info['online_val']['val_loss']:.4f}, acc {100 * info['online_val']['val_accuracy']:.2f}%).")
            # (a task without a val_accuracy metric reports acc as nan)
        if name == "random":
            b = info["best"]
            lines.append(f"random: {info['draws']} draws; best peak {b['peak']:.3g}, warm-up {b['warmup']:.2f}, "
                         f"decay {b['decay']}, final {b['final']:.2g}.")
    lr = s["lr_by_step"]
    lines += ["", "LR at 0%, 25%, 50%, 75%, 100% of training:", ""]
    for name, values in lr.items():
        n = len(values)
        picks = [values[min(n - 1, int(f * (n - 1)))] for f in (0, 0.25, 0.5, 0.75, 1.0)]
        lines.append(f"- {name}: " + ", ".join(f"{v:.3g}" for v in picks))
    if s.get("metagradient_runs"):
        lines.append(f"\nOne metagradient costs {s['metagradient_runs']:.2f} training runs (interleaved timing).")
    lines.append(f"\nOne training run: {s['run_seconds']:.2f} s; evaluation took {report['evaluation_seconds']:.1f} s.")
    return "\n".join(lines) + "\n"


def plot_schedules(report: dict, path) -> None:
    """``LR vs step`` for every candidate, and MGD's validation objective vs meta-step."""
    from mgd.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    s = report["schedule"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, values in s["lr_by_step"].items():
        style = "--" if name.startswith("start-") else "-"
        width = 2.0 if name.startswith("mgd") or name == "grid" else 1.0
        axes[0].plot(values, style, lw=width, label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("learning rate")
    axes[0].set_title("learned schedules vs the best grid schedule", fontsize=9)
    axes[0].legend(fontsize=7)
    for start, values in s["mgd_progress"].items():
        axes[1].plot(values, marker="o", ms=2, label=f"mgd-{start}")
        chosen = s["mgd_chosen_step"][start]
        axes[1].plot([chosen], [values[chosen]], "k*", ms=9)
    axes[1].set_xlabel("meta-step (each on a rotating crafting seed)")
    axes[1].set_ylabel("validation CE")
    axes[1].set_title("MGD progress (star: chosen iterate)", fontsize=9)
    if s["mgd_progress"]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
