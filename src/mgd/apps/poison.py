r"""Accuracy-degrading data poisoning by metagradient descent, with honest baselines.

The attacker controls ``P = round(ε N)`` training points (``ε`` = ``budget``) and wants the
victim's test accuracy to drop. It knows the training set, the validation set and the
victim's training recipe, but not the test set or the evaluation seeds (``protocols.md`` §3).

* **Where the poisons go** (``mode``). ``"replace"``: ``P`` clean points are overwritten, as in
  the paper (Engstrom et al. 2025 modify 2.5% of CIFAR-10). ``"add"``: ``P`` points are
  appended, as in ``protocols.md`` §3. Either way each poison starts as a copy of a random
  clean point (:func:`plan_poisons`).
* **Box.** Features stay in the valid box (:class:`PoisonBox`): ``[0, 1]`` per pixel for digits,
  the per-feature training ``[min, max]`` otherwise (mnist1d).
* **Labels** (``labels``). ``"fixed"``: a poison keeps the label of the point it copies (the
  GradCancel convention). ``"free"``: the attacker also picks hard labels; every method
  starts from *flipped* copies (a random wrong label), which it may keep.

**MGD** (:func:`mgd_poison`). The metaparameter is the whole training input matrix in box
coordinates, ``u ∈ [0,1]^{N×d}``, ``x = lo + (hi - lo) ⊙ u`` (:class:`PoisonInputs`, a
:class:`~mgd.metaparams.PerExample` kind whose ``apply`` swaps the minibatch inputs for the
rows of ``x``). The projection (:class:`PoisonProjection`) holds every clean row at its value
and clips poison rows to the box. MGD maximises the validation cross-entropy
:math:`f(u) = \mathrm{CE}_{val}(\theta_T(u))` by projected signed ascent

.. math:: u \leftarrow \Pi\big(u + \alpha\,\mathrm{sign}(\nabla_u f)\big),

with the exact metagradient from REPLAY, crafting seeds rotating across meta-steps, and the
iterate chosen by validation CE (:func:`mgd.descent.descend`).

**Baselines**, each returning a :class:`~mgd.apps.protocol.Candidate`:

* :func:`random_noise`: uniform points in the box (random labels when label-free);
* :func:`label_flips`: copies with random wrong labels (changes labels in either regime);
* :func:`error_max`: PGD in the box on the copies, maximising a clean surrogate's CE (after
  Fowl et al. 2021); steps tuned on val;
* :func:`gradcancel`: Lu, Kamath & Yu (ICML 2023): target parameters by GradPC (radius tuned
  on val), then poisons that cancel the clean gradient at the target, all parameters;
* :func:`backgradient`: Muñoz-González et al. (2017) as an ablation of MGD's own code: the same
  ascent through a short, non-metasmooth crafting run (high LR, no warm-up).

:func:`run_poisoning` runs the chosen methods, retrains every candidate on fresh evaluation
seeds (:func:`mgd.apps.protocol.evaluate`), and reports the paired test-accuracy *drop* against
the clean training set, the val-vs-test gap, the paired comparison of MGD with the strongest
baseline (chosen by validation drop) and, optionally, transfer to a different victim recipe.

Example:
    >>> from mgd.apps.poison import run_poisoning, victim_config
    >>> from mgd.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> cfg = victim_config("digits", steps=20, width=16)
    >>> report = run_poisoning(cfg, ds, budget=0.01, mode="replace", labels="fixed",
    ...                        methods=["random_noise", "mgd"], meta_steps=1,
    ...                        crafting_seeds=[0, 1], eval_seeds=[100, 101])
    >>> sorted(report["poisoning"]["drops"])
    ['mgd', 'random_noise']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mgd.apps.protocol import (
    Candidate,
    Cost,
    check_seeds,
    evaluate,
    evaluate_task,
    report_markdown,
    training_run_seconds,
)
from mgd.config import RunConfig, build_problem
from mgd.data import Dataset
from mgd.descent import SignedStep, descend
from mgd.errors import UserError
from mgd.evaluation import mean_ci
from mgd.apps.tasks import TaskRuns, objective_parts
from mgd.losses import Objective, clipped_margin
from mgd.batches import Field
from mgd.metaparams import PerExample, RunInfo, StepInputs
from mgd.training import Trainer

__all__ = [
    "METHODS",
    "MODES",
    "LABEL_REGIMES",
    "victim_config",
    "transfer_config",
    "PoisonBox",
    "PoisonPlan",
    "plan_poisons",
    "PoisonInputs",
    "PoisonProjection",
    "no_poison",
    "random_noise",
    "label_flips",
    "error_max",
    "gradpc_target",
    "gradient_cancelling_loss",
    "gradcancel",
    "mgd_poison",
    "backgradient",
    "run_poisoning",
    "poisoning_summary",
    "poisoning_markdown",
    "TASK_METHODS",
    "TaskPool",
    "task_poison_trainer",
    "run_task_poisoning",
]

METHODS = ("random_noise", "label_flips", "error_max", "gradcancel", "backgradient", "mgd")
MODES = ("replace", "add")
LABEL_REGIMES = ("fixed", "free")

# The frozen victim recipe (protocols.md §2), fixed before any attack ran: the project MLP
# (tanh, 2 x 128), SGD momentum 0.9, weight decay 5e-4, T = 300, and a 50-step LR warm-up,
# which docs/smoothness.md measured as (slightly) more metasmooth. The base LR was picked
# on clean *validation* loss over {0.02, 0.05, 0.1, 0.2} (2 seeds): 0.05 digits, 0.1 mnist1d.
_VICTIM = {
    "digits": {"lr": 0.05, "batch_size": 100},
    "mnist1d": {"lr": 0.1, "batch_size": 128},
}
_VICTIM_COMMON = {"steps": 300, "warmup_steps": 50, "weight_decay": 5e-4, "momentum": 0.9}


def victim_config(dataset: str, **overrides) -> RunConfig:
    """The default victim recipe for ``dataset`` (any field can be overridden)."""
    values = {"dataset": dataset, **_VICTIM_COMMON, **_VICTIM.get(dataset, {}), **overrides}
    return RunConfig(**values).resolved()


def transfer_config(config: RunConfig) -> RunConfig:
    """A different victim for the transfer check: ReLU instead of the activation, double width."""
    activation = "relu" if config.activation != "relu" else "gelu"
    return RunConfig(**{**config.to_dict(), "activation": activation, "width": 2 * config.width}).resolved()


# --------------------------------------------------------------------------- the box and plan


@dataclass(frozen=True)
class PoisonBox:
    """Per-feature bounds ``lo ≤ x ≤ hi`` (arrays shaped like one example)."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def for_dataset(cls, dataset: Dataset) -> "PoisonBox":
        """``[0, 1]`` for digits (pixels / 16); the per-feature training [min, max] otherwise."""
        if dataset.name == "digits":
            shape = dataset.x_train.shape[1:]
            return cls(np.zeros(shape), np.ones(shape))
        return cls(dataset.x_train.min(axis=0), dataset.x_train.max(axis=0))

    @property
    def width(self) -> np.ndarray:
        """``hi - lo``, with constant features given width 1 (they cannot move anyway)."""
        width = self.hi - self.lo
        return np.where(width > 0, width, 1.0)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lo, self.hi)

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        return (x - self.lo) / self.width

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        return self.lo + self.width * u

    def contains(self, x: np.ndarray, tol: float = 1e-9) -> bool:
        return bool(np.all(x >= self.lo - tol) and np.all(x <= self.hi + tol))


@dataclass(frozen=True)
class PoisonPlan:
    """Where the poisons sit in the training set and how they start.

    Attributes:
        x, y: the training set with every poison slot holding its starting point (a copy of
            clean point ``sources[j]``, label kept or flipped).
        slots: indices of the poison rows in ``x``.
        sources: the clean training indices the poisons were copied from.
        mode, labels: ``"replace"``/``"add"`` and ``"fixed"``/``"free"``.
    """

    x: np.ndarray
    y: np.ndarray
    slots: np.ndarray
    sources: np.ndarray
    mode: str
    labels: str

    @property
    def clean_mask(self) -> np.ndarray:
        mask = np.ones(len(self.y), dtype=bool)
        mask[self.slots] = False
        return mask

    def with_poisons(self, x_poison: np.ndarray, y_poison: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The training set with the poison rows set to ``x_poison`` (and labels ``y_poison``)."""
        x, y = self.x.copy(), self.y.copy()
        x[self.slots] = x_poison
        if y_poison is not None:
            y[self.slots] = y_poison
        return x, y


def poison_count(num_train: int, budget: float) -> int:
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise UserError(f"the poison budget must be a fraction in (0, 1], got {budget}")
    count = int(round(budget * num_train))
    if count < 1:
        raise UserError(
            f"a budget of {budget:g} of {num_train} training points is less than one poison; raise --budget"
        )
    return count


def plan_poisons(dataset: Dataset, *, budget: float, mode: str, labels: str, seed: int = 0) -> PoisonPlan:
    """Choose ``round(budget · N)`` random clean points to copy, and where the copies go.

    ``seed`` is the attacker's own seed (not a crafting or evaluation seed); every method
    starts from the same plan, so they differ only in what they do to the poisons.
    """
    if mode not in MODES:
        raise UserError(f"unknown poisoning mode {mode!r}; choose replace or add")
    if labels not in LABEL_REGIMES:
        raise UserError(f"unknown label regime {labels!r}; choose fixed or free")
    n, classes = len(dataset.y_train), dataset.num_classes
    count = poison_count(n, budget)
    if labels == "free" and classes < 2:
        raise UserError("label-free poisoning needs at least two classes")
    rng = np.random.default_rng([seed, 4242])
    sources = np.sort(rng.choice(n, size=count, replace=False))
    y_poison = dataset.y_train[sources].copy()
    if labels == "free":  # flipped copies: a uniformly random wrong label
        y_poison = (y_poison + rng.integers(1, classes, size=count)) % classes
    if mode == "replace":
        x, y, slots = dataset.x_train.copy(), dataset.y_train.copy(), sources.copy()
        y[slots] = y_poison
    else:
        x = np.concatenate([dataset.x_train, dataset.x_train[sources]])
        y = np.concatenate([dataset.y_train, y_poison])
        slots = np.arange(n, n + count)
    return PoisonPlan(x, y, slots, sources, mode, labels)


# --------------------------------------------------------------------------- the metaparameter


class PoisonInputs(PerExample):
    """``poison_inputs``: the training inputs in box coordinates, ``x = lo + (hi - lo) ⊙ u``.

    The value has one row per training example (shape ``(N, *input_shape)``); step ``t``
    reads the rows of its minibatch and trains on them instead of the stored inputs (the
    batch's ``field``: position 0 of an ``(x, y)`` batch, or any float field of a user's run). At the
    default value (the stored inputs' coordinates) training is unchanged. Box coordinates
    make one signed step move every feature by the same fraction of its range.
    """

    name = "poison_inputs"

    def __init__(self, lo: Tensor, width: Tensor, field: Field = 0):
        self.lo, self.width, self.field = lo, width, field

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return tuple(run.data.field(self.field).shape)

    def default(self, run: RunInfo) -> Tensor:
        return (run.data.field(self.field) - self.lo) / self.width

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        return inputs.with_field(self.field, self.lo + self.width * local)


@dataclass(frozen=True)
class PoisonProjection:
    """Keep clean rows at ``clean`` and clip poison rows (``mask``) to the unit box."""

    mask: Tensor  # (N,) bool: True for poison rows
    clean: Tensor  # (N, ...) the clean rows' values

    def __call__(self, z: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (z.dim() - 1)
        return torch.where(self.mask.view(shape), z.clamp(0.0, 1.0), self.clean)

    def check(self, z0: Tensor) -> None:
        if z0.shape != self.clean.shape or self.mask.shape != z0.shape[:1]:
            raise UserError(f"poison projection expects values shaped {tuple(self.clean.shape)}")


# --------------------------------------------------------------------------- shared helpers


def _seeded(config: RunConfig, seed: int) -> RunConfig:
    return RunConfig(**{**config.to_dict(), "seed": seed})


def _train_clean(config: RunConfig, dataset: Dataset, seed: int):
    """A clean model (the attacker's surrogate): ``(problem, final state)``."""
    problem = build_problem(_seeded(config, seed), dataset=dataset)
    return problem, problem.trainer.run()


def _val_score(config: RunConfig, dataset: Dataset, x: np.ndarray, y: np.ndarray, seeds: Sequence[int]) -> tuple[float, float]:
    """Attacker-side score of a poisoned training set: mean val (accuracy, CE) over ``seeds``."""
    poisoned = replace(dataset, x_train=np.ascontiguousarray(x), y_train=np.ascontiguousarray(y))
    accs, losses = [], []
    for seed in seeds:
        problem = build_problem(_seeded(config, seed), dataset=poisoned)
        final = problem.trainer.run()
        with torch.no_grad():
            logits = problem.trainer.predict(final.params, final.buffers, problem.x_val)
        accs.append(float((logits.argmax(1) == problem.y_val).double().mean()))
        losses.append(float(F.cross_entropy(logits.double(), problem.y_val)))
    return float(np.mean(accs)), float(np.mean(losses))


def _run_seconds(config: RunConfig, dataset: Dataset) -> float:
    """Seconds of one victim training run (the unit of ``Cost.training_runs``)."""
    return training_run_seconds(build_problem(_seeded(config, 0), dataset=dataset).trainer)


def _candidate(name: str, plan: PoisonPlan, x_poison: np.ndarray, y_poison: np.ndarray, *, seconds: float,
               runs: float, kind: str = "baseline", info: dict | None = None) -> Candidate:
    x, y = plan.with_poisons(x_poison, y_poison)
    return Candidate(name, x, y, cost=Cost(seconds, runs), kind=kind, info=dict(info or {}))


def _poison_labels(plan: PoisonPlan) -> np.ndarray:
    return plan.y[plan.slots].copy()


def _tune(config: RunConfig, dataset: Dataset, options: Sequence, build: Callable, seeds: Sequence[int]):
    """Pick the option whose poisons give the lowest mean *validation* accuracy (ties: higher CE).

    ``build(option) -> (x, y)`` makes the poisoned training set. Returns
    ``(best option, its (x, y), table of (option, val acc, val CE))``.
    """
    table, best = [], None
    for option in options:
        x, y = build(option)
        acc, ce = _val_score(config, dataset, x, y, seeds)
        table.append({"option": option, "val_accuracy": acc, "val_loss": ce})
        if best is None or (acc, -ce) < (best[1], -best[2]):
            best = (option, acc, ce, (x, y))
    return best[0], best[3], table


# --------------------------------------------------------------------------- baselines


def no_poison(dataset: Dataset) -> Candidate:
    """The clean training set (the reference every drop is measured against)."""
    return Candidate("no_poison", dataset.x_train, dataset.y_train, kind="reference")


def random_noise(dataset: Dataset, plan: PoisonPlan, box: PoisonBox, *, seed: int = 0) -> Candidate:
    """Uniform points in the box; labels: the plan's (label-fixed) or uniformly random (label-free)."""
    started = time.perf_counter()
    rng = np.random.default_rng([seed, 7])
    count = len(plan.slots)
    u = rng.random((count,) + box.lo.shape)
    y = _poison_labels(plan) if plan.labels == "fixed" else rng.integers(0, dataset.num_classes, size=count)
    return _candidate("random_noise", plan, box.from_unit(u), y, seconds=time.perf_counter() - started, runs=0.0)


def label_flips(dataset: Dataset, plan: PoisonPlan, *, seed: int = 0) -> Candidate:
    """Copies of the plan's clean points with uniformly random *wrong* labels.

    This changes labels even in the label-fixed regime (it is the standard reference attack);
    reports flag it with ``info["changes_labels"]``.
    """
    started = time.perf_counter()
    rng = np.random.default_rng([seed, 11])
    true = dataset.y_train[plan.sources]
    y = (true + rng.integers(1, dataset.num_classes, size=len(true))) % dataset.num_classes
    return _candidate("label_flips", plan, dataset.x_train[plan.sources], y, seconds=time.perf_counter() - started,
                      runs=0.0, info={"changes_labels": True})


def error_max(config: RunConfig, dataset: Dataset, plan: PoisonPlan, box: PoisonBox, *,
              step_counts: Sequence[int] = (5, 20, 80), step_size: float = 0.05,
              surrogate_seed: int = 0, tune_seeds: Sequence[int] = (0, 1)) -> Candidate:
    r"""Error-maximising perturbations (after Fowl et al. 2021): PGD in the box on the copies.

    A clean surrogate ``θ_c`` is trained once. The poisons ascend its loss on their labels,
    :math:`x \leftarrow \Pi_{box}(x + \alpha (hi-lo) \odot \mathrm{sign}\nabla_x \mathrm{CE}(f_{θ_c}(x), y))`.
    The number of PGD steps is tuned on validation over ``step_counts`` (``tune_seeds``).
    """
    started = time.perf_counter()
    problem, state = _train_clean(config, dataset, surrogate_seed)
    trainer = problem.trainer
    lo, hi = (torch.as_tensor(b, dtype=trainer.dtype) for b in (box.lo, box.hi))
    width = torch.as_tensor(box.width, dtype=trainer.dtype)
    y = torch.as_tensor(_poison_labels(plan))
    x = torch.as_tensor(plan.x[plan.slots], dtype=trainer.dtype)
    iterates, done = {}, 0
    for count in sorted(step_counts):
        while done < count:
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(trainer.predict(state.params, state.buffers, x), y)
            (grad,) = torch.autograd.grad(loss, x)
            x = torch.maximum(torch.minimum(x.detach() + step_size * width * grad.sign(), hi), lo)
            done += 1
        iterates[count] = box.clip(x.detach().double().numpy())  # float32 rounding of the bounds
    labels = _poison_labels(plan)
    best, _, table = _tune(config, dataset, list(step_counts), lambda c: plan.with_poisons(iterates[c], labels), tune_seeds)
    seconds = time.perf_counter() - started
    runs = 1 + len(step_counts) * len(tune_seeds)
    return _candidate("error_max", plan, iterates[best], labels, seconds=seconds, runs=runs,
                      info={"pgd_steps": best, "step_size": step_size, "tuning": table})


def gradpc_target(problem, params: Tensor, x: Tensor, y: Tensor, *, radius: float, batch_size: int = 64) -> Tensor:
    r"""GradPC target parameters (Lu, Kamath & Yu 2023, step 1).

    One pass over the clean set in minibatches of ``batch_size``: add the unit-L2-normalised
    loss gradient to a perturbation ``δ`` (ascent) and project ``δ`` onto the L2 ball of
    ``radius`` after every step. Returns ``θ_c + δ``.
    """
    delta = torch.zeros_like(params)
    for start in range(0, len(y), batch_size):
        p = (params + delta).detach().requires_grad_(True)
        loss = F.cross_entropy(problem.trainer.predict(p, problem.trainer.flat_buffers(), x[start:start + batch_size]),
                               y[start:start + batch_size])
        (grad,) = torch.autograd.grad(loss, p)
        delta = delta + grad / grad.norm().clamp_min(1e-12)
        norm = delta.norm()
        if norm > radius:
            delta = delta * (radius / norm)
    return (params + delta).detach()


def gradient_cancelling_loss(problem, target: Tensor, clean_grad: Tensor, x_poison: Tensor, y_poison: Tensor) -> Tensor:
    r"""``‖G_clean + Σ_p ∇_θ ℓ(θ_target; x_p, y_p)‖²`` (GradCancel's objective, all parameters).

    ``clean_grad`` is the *summed* clean-set gradient at the target. Zero means the target is a
    stationary point of the poisoned training loss.
    """
    p = target.detach().requires_grad_(True)
    logits = problem.trainer.predict(p, problem.trainer.flat_buffers(), x_poison)
    loss = F.cross_entropy(logits, y_poison, reduction="sum")
    (grad,) = torch.autograd.grad(loss, p, create_graph=True)
    return (clean_grad + grad).pow(2).sum()


def gradcancel(config: RunConfig, dataset: Dataset, plan: PoisonPlan, box: PoisonBox, *,
               radii: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0), iterations: int = 300, lr: float = 0.05,
               surrogate_seed: int = 0, tune_seeds: Sequence[int] = (0, 1)) -> Candidate:
    r"""GradCancel (Lu, Kamath & Yu, ICML 2023), with all parameters and the radius tuned on val.

    1. Train a clean model ``θ_c``; target ``θ_t`` = GradPC(``θ_c``, radius ``ε_w``).
    2. ``G = Σ_{i ∈ clean} ∇ℓ(θ_t; x_i, y_i)`` once, in float64.
    3. Minimise :func:`gradient_cancelling_loss` over the poison inputs (labels fixed), full
       batch, with Adam in box coordinates (step ``lr``, cosine-decayed over ``iterations``;
       the official code uses plain steps of 10 on MNIST pixels), clipping to the box each
       step and stopping early below 1.
    4. ``ε_w`` is chosen from ``radii`` by validation accuracy of victims trained on the poisons.
    """
    started = time.perf_counter()
    problem64, state = _train_clean(RunConfig(**{**config.to_dict(), "dtype": "float64"}), dataset, surrogate_seed)
    clean = plan.clean_mask
    x_clean = torch.as_tensor(plan.x[clean], dtype=torch.float64)
    y_clean = torch.as_tensor(plan.y[clean])
    y_poison = torch.as_tensor(_poison_labels(plan))
    lo, width = torch.as_tensor(box.lo), torch.as_tensor(box.width)
    u_start = torch.as_tensor(box.to_unit(plan.x[plan.slots]))
    results = {}
    for radius in radii:
        target = gradpc_target(problem64, state.params, x_clean, y_clean, radius=radius)
        p = target.clone().requires_grad_(True)
        clean_loss = F.cross_entropy(problem64.trainer.predict(p, problem64.trainer.flat_buffers(), x_clean), y_clean,
                                     reduction="sum")
        (clean_grad,) = torch.autograd.grad(clean_loss, p)
        u = u_start.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
        value = math.inf
        for _ in range(iterations):
            loss = gradient_cancelling_loss(problem64, target, clean_grad, lo + width * u, y_poison)
            value = float(loss.detach())
            if value < 1.0:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            with torch.no_grad():
                u.clamp_(0.0, 1.0)
        results[radius] = (box.from_unit(u.detach().numpy()), value, float(clean_grad.pow(2).sum()))
    labels = _poison_labels(plan)
    best, _, table = _tune(config, dataset, list(radii), lambda r: plan.with_poisons(results[r][0], labels), tune_seeds)
    for row in table:
        row["final_cancel_loss"], row["initial_clean_grad_sq"] = results[row["option"]][1], results[row["option"]][2]
    seconds = time.perf_counter() - started
    return _candidate("gradcancel", plan, results[best][0], labels, seconds=seconds,
                      runs=1 + len(radii) * len(tune_seeds),
                      info={"radius": best, "iterations": iterations, "lr": lr, "tuning": table})


# --------------------------------------------------------------------------- MGD


#: What MGD maximises on validation: the cross-entropy, or the clipped margin
#: (:func:`mgd.losses.clipped_margin`), which rewards flipping predictions rather than
#: ever more confident mistakes.
OBJECTIVES = ("ce", "margin")


def _poison_trainer(config: RunConfig, dataset: Dataset, plan: PoisonPlan, box: PoisonBox, seed: int,
                    objective: str = "ce"):
    """``(trainer with the poison_inputs kind, validation objective)`` for crafting seed ``seed``."""
    poisoned = replace(dataset, x_train=plan.x, y_train=plan.y)
    problem = build_problem(_seeded(config, seed), dataset=poisoned)
    base = problem.trainer
    dtype = base.dtype
    kind = PoisonInputs(torch.as_tensor(box.lo, dtype=dtype), torch.as_tensor(box.width, dtype=dtype))
    trainer = Trainer(
        problem.model, base.optimizer, base.x_train, base.y_train, steps=base.steps, batch_size=base.batch_size,
        lr=base.lr, weight_decay=base.weight_decay, seed=base.seed, metaparams=[kind], warmup_steps=base.warmup_steps,
    )
    if objective == "margin":
        return trainer, Objective(problem.model, (problem.x_val, problem.y_val), loss=clipped_margin())
    return trainer, problem.val_objective()


def mgd_poison(config: RunConfig, dataset: Dataset, plan: PoisonPlan, box: PoisonBox, *,
               meta_steps: int = 50, step_size: float = 0.05, crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
               seeds_per_step: int = 1, objective: str = "ce", recipes: Sequence[RunConfig] = (),
               name: str = "mgd", kind: str = "mgd", run_seconds: float | None = None,
               state=None, on_step: Callable | None = None, progress: Callable | None = None,
               make: Callable[[int], tuple] | None = None) -> Candidate:
    """MGD poisoning: projected signed ascent of a validation objective on the poison inputs.

    ``config`` is the *crafting* recipe (the victim's for MGD; a short non-smooth one for
    :func:`backgradient`). ``objective`` is one of :data:`OBJECTIVES`. ``recipes``: further
    crafting recipes (e.g. other widths or activations), so that the poisons are optimised
    against several victims at once: crafting seed number ``i`` (its position in
    ``crafting_seeds``) trains recipe ``i mod (1 + len(recipes))``, and with
    ``seeds_per_step`` at least that many each meta-step averages the metagradient over
    recipes. ``state``/``on_step`` let a caller save and resume the descent. ``make``:
    instead of ``config`` (``None``) and ``recipes``, ``seed -> (run with the poison_inputs
    kind, objective)`` for a user's task (:func:`task_poison_trainer`). The returned
    candidate's ``info["history"]`` lists the validation objective per meta-step.
    """
    if meta_steps < 0:
        raise UserError(f"meta-steps must be >= 0, got {meta_steps}")
    if objective not in OBJECTIVES:
        raise UserError(f"the poisoning objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    started = time.perf_counter()
    if make is None:
        crafting = [config, *recipes]
        position = {seed: i for i, seed in enumerate(crafting_seeds)}

        def make(seed: int):
            return _poison_trainer(crafting[position[seed] % len(crafting)], dataset, plan, box, seed, objective)

        recipe_names = [describe_recipe(c) for c in crafting]
        dtype = torch.float64 if config.dtype == "float64" else torch.float32
        steps, lr = config.steps, config.lr
    else:
        run = make(crafting_seeds[0])[0]
        recipe_names, dtype, steps, lr = ["the task's run"], run.dtype, run.steps, run.lr
    u0 = torch.as_tensor(box.to_unit(plan.x), dtype=dtype)
    mask = torch.zeros(len(plan.y), dtype=torch.bool)
    mask[torch.as_tensor(plan.slots)] = True
    projection = PoisonProjection(mask, u0.clone())
    history = []

    def record(step, new_state):
        history.append({"step": step.step, "seed": step.seed, "val_objective": step.value, "seconds": step.seconds})
        if on_step is not None:
            on_step(step, new_state)

    final = descend(
        make,
        {"poison_inputs": u0},
        optimizer=SignedStep(step_size),
        projections={"poison_inputs": projection},
        steps=meta_steps,
        seeds=list(crafting_seeds),
        seeds_per_step=seeds_per_step,
        maximize=True,
        state=state,
        on_step=record,
        progress=progress,
    )
    u = final.best_z["poison_inputs"].double().numpy()
    seconds = time.perf_counter() - started
    unit = run_seconds if run_seconds else None
    return _candidate(
        name, plan, box.clip(box.from_unit(u[plan.slots])), _poison_labels(plan), seconds=seconds,
        runs=seconds / unit if unit else math.nan, kind=kind,
        info={"best_step": final.best_step, "best_val_objective": final.best_value, "meta_steps": meta_steps,
              "step_size": step_size, "crafting_seeds": list(crafting_seeds), "crafting_steps": steps,
              "seeds_per_step": seeds_per_step, "objective": objective, "crafting_recipes": recipe_names,
              "crafting_lr": lr, "history": history},
    )


def describe_recipe(config: RunConfig) -> str:
    """A short name of a victim recipe, e.g. ``mlp tanh 2x128, sgd lr 0.05, T=300``."""
    return (f"{config.model} {config.activation} {config.depth}x{config.width}, {config.optimizer} lr {config.lr:g}, "
            f"T={config.steps}")


def backgradient_config(config: RunConfig, *, horizon: int = 60, lr: float = 0.3) -> RunConfig:
    """The back-gradient crafting run: short horizon, high LR and no warm-up (not metasmooth)."""
    return RunConfig(**{**config.to_dict(), "steps": horizon, "lr": lr, "warmup_steps": 0}).resolved()


def backgradient(config: RunConfig, dataset: Dataset, plan: PoisonPlan, box: PoisonBox, *,
                 meta_steps: int = 50, step_size: float = 0.05, crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
                 horizon: int = 60, lr: float = 0.3, run_seconds: float | None = None, **kwargs) -> Candidate:
    """Back-gradient poisoning (Muñoz-González et al. 2017) as an ablation of :func:`mgd_poison`.

    The same signed ascent, but differentiating through a short (``horizon`` steps),
    high-LR, no-warm-up crafting run: MGD without the metasmooth recipe or the full horizon.
    """
    return mgd_poison(backgradient_config(config, horizon=horizon, lr=lr), dataset, plan, box,
                      meta_steps=meta_steps, step_size=step_size, crafting_seeds=crafting_seeds,
                      name="backgradient", kind="baseline", run_seconds=run_seconds, **kwargs)


# --------------------------------------------------------------------------- the whole protocol


def poisoning_summary(report: Mapping, *, mgd: str = "mgd", gradcancel_name: str = "gradcancel") -> dict:
    """Paired drops against ``no_poison`` per method, the strongest baseline, MGD vs it.

    * ``drops[m]``: test and val accuracy drop ``acc(no_poison) - acc(m)`` per evaluation seed
      (mean, 95% CI), and the val-minus-test gap of the drop.
    * ``strongest_baseline``: the baseline with the largest *validation* drop (never test).
    * ``mgd_vs_strongest``: paired ``drop(mgd) - drop(strongest)`` on test.
    * ``mgd_over_gradcancel``: ratio of mean test drops.
    """
    methods = report["methods"]
    if "no_poison" not in methods:
        return {}
    clean = methods["no_poison"]["per_seed"]
    drops = {}
    for name, m in methods.items():
        if name == "no_poison":
            continue
        test = [c["test_accuracy"] - r["test_accuracy"] for c, r in zip(clean, m["per_seed"])]
        val = [c["val_accuracy"] - r["val_accuracy"] for c, r in zip(clean, m["per_seed"])]
        drops[name] = {
            "kind": m["kind"],
            "test_drop": mean_ci(test),
            "val_drop": mean_ci(val),
            "val_minus_test": float(np.mean(val) - np.mean(test)),
            "per_seed_test_drop": test,
        }
    baselines = [n for n, d in drops.items() if d["kind"] == "baseline"]
    out = {"drops": drops, "strongest_baseline": None}
    if baselines:
        strongest = max(baselines, key=lambda n: drops[n]["val_drop"]["mean"])
        out["strongest_baseline"] = strongest
        if mgd in drops:
            diff = [a - b for a, b in zip(drops[mgd]["per_seed_test_drop"], drops[strongest]["per_seed_test_drop"])]
            out["mgd_vs_strongest"] = {"baseline": strongest, "test_drop_diff": mean_ci(diff)}
    if mgd in drops and gradcancel_name in drops:
        g = drops[gradcancel_name]["test_drop"]["mean"]
        out["mgd_over_gradcancel"] = drops[mgd]["test_drop"]["mean"] / g if g != 0 else math.inf
    return out


def poisoning_markdown(summary: Mapping, title: str) -> str:
    """The drop table (points, mean ± 95% CI over evaluation seeds, paired with no_poison)."""
    if not summary:
        return ""
    lines = [f"### {title}", "",
             "| method | kind | test drop (pts) | val drop (pts) | val − test gap (pts) |", "|---|---|---|---|---|"]
    for name, d in summary["drops"].items():
        t, v = d["test_drop"], d["val_drop"]
        lines.append(f"| {name} | {d['kind']} | {100 * t['mean']:+.2f} ± {100 * t['ci']:.2f} "
                     f"| {100 * v['mean']:+.2f} ± {100 * v['ci']:.2f} | {100 * d['val_minus_test']:+.2f} |")
    lines.append("")
    if summary.get("strongest_baseline"):
        lines.append(f"Strongest baseline by validation drop: **{summary['strongest_baseline']}**.")
    if "mgd_vs_strongest" in summary:
        d = summary["mgd_vs_strongest"]["test_drop_diff"]
        lines.append(f"MGD drop minus {summary['mgd_vs_strongest']['baseline']} drop (paired, test): "
                     f"**{100 * d['mean']:+.2f} ± {100 * d['ci']:.2f} pts**.")
    if "mgd_over_gradcancel" in summary:
        lines.append(f"MGD drop / GradCancel drop: {summary['mgd_over_gradcancel']:.2f}.")
    return "\n".join(lines) + "\n"


def _build_all(methods: Sequence[str], builders: Mapping[str, Callable[[], Candidate]],
               finished: Mapping[str, Candidate], unit: float, on_candidate) -> list[Candidate]:
    """Each method's candidate: the finished one (resume), else built now, its cost in
    training runs filled from its seconds when it did not count them, and handed to
    ``on_candidate`` (to save it)."""
    out = []
    for name in methods:
        if name in finished:
            candidate = finished[name]
        else:
            candidate = builders[name]()
            if candidate.cost.training_runs != candidate.cost.training_runs:  # nan: fill from seconds
                candidate.cost.training_runs = candidate.cost.seconds / unit
            if on_candidate is not None:
                on_candidate(candidate)
        out.append(candidate)
    return out


def run_poisoning(
    config: RunConfig,
    dataset: Dataset,
    *,
    budget: float = 0.03,
    mode: str = "replace",
    labels: str = "fixed",
    methods: Sequence[str] = METHODS,
    meta_steps: int = 50,
    step_size: float = 0.05,
    seeds_per_step: int = 2,
    objective: str = "margin",
    craft_also: Sequence[RunConfig] = (),
    crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_seeds: Sequence[int] = tuple(range(100, 110)),
    transfer: RunConfig | None = None,
    attack_seed: int = 0,
    finished: Mapping[str, Candidate] | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    mgd_state=None,
    on_mgd_step: Callable | None = None,
    progress: Callable | None = None,
    eval_workers: int = 1,
) -> dict:
    """Run the poisoning protocol and return the report (see the module docstring).

    Args:
        config: the frozen victim recipe, used for crafting (MGD, tuning) and evaluation.
        dataset: the dataset (test is read only by the final evaluation).
        budget, mode, labels: the threat model.
        methods: any of :data:`METHODS` (``no_poison`` is always evaluated).
        meta_steps, step_size: MGD's (and back-gradient's) ascent.
        seeds_per_step, objective, craft_also: MGD's metagradient averaging, validation
            objective and further crafting recipes (:func:`mgd_poison`).
        crafting_seeds, eval_seeds: disjoint seed sets.
        transfer: another victim recipe to evaluate the same poisons on (``None``: skip).
        attack_seed: seeds the choice of points to copy and the random baselines.
        finished: candidates already computed (resume); ``on_candidate`` is called for new ones.
        mgd_state, on_mgd_step: resume and checkpoint MGD's descent.

    Returns:
        The :func:`mgd.apps.protocol.evaluate` report plus ``"poisoning"`` (drops,
        :func:`poisoning_summary`), optionally ``"transfer"``, and ``"setup"``.
    """
    methods = list(methods)
    if not methods:
        raise UserError("no poisoning methods given; choose from " + ", ".join(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown poisoning method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"poisoning methods listed twice: {methods}")
    crafting_seeds, eval_seeds = list(crafting_seeds), list(eval_seeds)
    if not crafting_seeds:
        raise UserError("need at least one crafting seed")
    check_seeds(crafting_seeds, eval_seeds)
    plan = plan_poisons(dataset, budget=budget, mode=mode, labels=labels, seed=attack_seed)
    box = PoisonBox.for_dataset(dataset)
    unit = _run_seconds(config, dataset)
    tune_seeds = crafting_seeds[:2]
    finished = dict(finished or {})
    builders = {
        "random_noise": lambda: random_noise(dataset, plan, box, seed=attack_seed),
        "label_flips": lambda: label_flips(dataset, plan, seed=attack_seed),
        "error_max": lambda: error_max(config, dataset, plan, box, tune_seeds=tune_seeds),
        "gradcancel": lambda: gradcancel(config, dataset, plan, box, tune_seeds=tune_seeds),
        "backgradient": lambda: backgradient(config, dataset, plan, box, meta_steps=meta_steps, step_size=step_size,
                                             crafting_seeds=crafting_seeds, run_seconds=unit),
        "mgd": lambda: mgd_poison(config, dataset, plan, box, meta_steps=meta_steps, step_size=step_size,
                                  crafting_seeds=crafting_seeds, seeds_per_step=seeds_per_step, objective=objective,
                                  recipes=craft_also, run_seconds=unit, state=mgd_state,
                                  on_step=on_mgd_step, progress=progress),
    }
    candidates = [no_poison(dataset), *_build_all(methods, builders, finished, unit, on_candidate)]
    for candidate in candidates[1:]:
        if plan.x.shape[0] != len(candidate.y_train) or not box.contains(candidate.x_train[plan.slots]):
            raise AssertionError(f"{candidate.name} produced poisons outside the box; please report this bug")
    report = evaluate(config, dataset, candidates, eval_seeds, attack=True, progress=progress, workers=eval_workers)
    report["poisoning"] = poisoning_summary(report)
    if transfer is not None:
        transferred = evaluate(
            transfer, dataset, candidates, eval_seeds, attack=True, progress=progress, workers=eval_workers
        )
        report["transfer"] = {"config": transfer.to_dict(), "report": transferred,
                              "poisoning": poisoning_summary(transferred)}
    report["setup"] = {
        "budget": budget, "poisons": int(len(plan.slots)), "mode": mode, "labels": labels,
        "train_size": int(len(plan.y)), "box": "[0,1]" if dataset.name == "digits" else "per-feature train [min,max]",
        "crafting_seeds": crafting_seeds, "meta_steps": meta_steps, "step_size": step_size,
        "seeds_per_step": seeds_per_step, "objective": objective,
        "crafting_recipes": [describe_recipe(c) for c in (config, *craft_also)],
        "victim": config.to_dict(), "seconds_per_training_run": unit, "sources": plan.sources.tolist(),
        "slots": plan.slots.tolist(),
    }
    return report


# --------------------------------------------------------------------------- a user's task


#: Methods for a user's task (``mgd poison --task``): the others need a preset's surrogate
#: recipe (error_max, gradcancel) or its crafting recipe (backgradient).
TASK_METHODS = ("random_noise", "label_flips", "mgd")


@dataclass(frozen=True, eq=False)
class TaskPool:
    """A user's classifier task as the poisoning methods see it: its training inputs (at
    ``field``) and labels as arrays, the attributes of a :class:`~mgd.data.Dataset` that
    :func:`plan_poisons`, :class:`PoisonBox`, :func:`random_noise` and :func:`label_flips` read."""

    runs: TaskRuns
    field: Field
    x_train: np.ndarray
    y_train: np.ndarray
    num_classes: int
    name: str = "task"

    @classmethod
    def of(cls, runs: TaskRuns, field: Field = 0) -> "TaskPool":
        missing = [name for name, have in (("val_accuracy", runs.metric_names), ("test_accuracy", runs.test_names))
                   if name not in have]
        if missing:
            raise UserError(
                "accuracy-degrading poisoning reports accuracy drops: the task needs "
                "metrics={'val_accuracy': mgd.Metric(...)} and test={'test_accuracy': mgd.Metric(...)}"
            )
        x, y = runs.training_set(field)
        return cls(runs, field, x, y, int(runs.num_classes))


def task_poison_trainer(pool: TaskPool, plan: PoisonPlan, box: PoisonBox, seed: int, objective: str = "ce"):
    """``(run with the poison_inputs kind on the plan's training set, validation objective)``
    for crafting seed ``seed`` of a user's task."""
    dtype = pool.runs.task(seed).run.dtype
    kind = PoisonInputs(torch.as_tensor(box.lo, dtype=dtype), torch.as_tensor(box.width, dtype=dtype), field=pool.field)
    run, task_objective = pool.runs.with_training_set(seed, plan.x, plan.y, pool.field, metaparams=[kind])
    if objective == "margin":
        val = objective_parts(task_objective, "the margin objective")
        return run, Objective(val.model, val.data, loss=clipped_margin(), batch_size=val.batch_size)
    return run, task_objective


def run_task_poisoning(
    pool: TaskPool,
    *,
    budget: float = 0.03,
    labels: str = "fixed",
    methods: Sequence[str] = TASK_METHODS,
    meta_steps: int = 50,
    step_size: float = 0.05,
    seeds_per_step: int = 2,
    objective: str = "margin",
    crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_seeds: Sequence[int] = tuple(range(100, 110)),
    attack_seed: int = 0,
    finished: Mapping[str, Candidate] | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    mgd_state=None,
    on_mgd_step: Callable | None = None,
    progress: Callable | None = None,
    eval_workers: int = 1,
    transfer: TaskRuns | None = None,
) -> dict:
    """:func:`run_poisoning` on a user's task: poisons replace ``budget`` of its training points
    (the paper's setting), features stay in the per-feature training box, and every candidate is
    retrained by the task function and measured on its ``val_accuracy`` metric and held-out
    ``test_accuracy`` (:func:`mgd.apps.protocol.evaluate_task`). Methods: :data:`TASK_METHODS`.
    ``transfer``: another task (another victim recipe on the same training set, e.g. another
    width) on which the same poisoned training sets are evaluated too, never used in crafting."""
    methods = list(methods)
    outside = [m for m in methods if m not in TASK_METHODS]
    if outside or not methods:
        raise UserError(f"{', '.join(outside) or 'no method'}: a task can be poisoned by {', '.join(TASK_METHODS)}")
    crafting_seeds, eval_seeds = list(crafting_seeds), list(eval_seeds)
    check_seeds(crafting_seeds, eval_seeds)
    plan = plan_poisons(pool, budget=budget, mode="replace", labels=labels, seed=attack_seed)
    box = PoisonBox.for_dataset(pool)
    unit = training_run_seconds(pool.runs.task(crafting_seeds[0]).run)
    finished = dict(finished or {})
    builders = {
        "random_noise": lambda: random_noise(pool, plan, box, seed=attack_seed),
        "label_flips": lambda: label_flips(pool, plan, seed=attack_seed),
        "mgd": lambda: mgd_poison(None, None, plan, box, meta_steps=meta_steps, step_size=step_size,
                                  crafting_seeds=crafting_seeds, seeds_per_step=seeds_per_step, objective=objective,
                                  run_seconds=unit, state=mgd_state, on_step=on_mgd_step, progress=progress,
                                  make=lambda seed: task_poison_trainer(pool, plan, box, seed, objective)),
    }
    candidates = [no_poison(pool), *_build_all(methods, builders, finished, unit, on_candidate)]
    for candidate in candidates:  # where TaskRuns.evaluate puts the inputs back
        candidate.info["input_field"] = pool.field
    report = evaluate_task(pool.runs, candidates, eval_seeds, attack=True, primary="test_accuracy",
                           progress=progress, workers=eval_workers)
    report["poisoning"] = poisoning_summary(report)
    if transfer is not None:
        other = TaskPool.of(transfer, pool.field)
        if other.x_train.shape != pool.x_train.shape:
            raise UserError(f"the transfer task trains on inputs shaped {other.x_train.shape[1:]} x {len(other.x_train)}, "
                            f"not {pool.x_train.shape[1:]} x {len(pool.x_train)}; it must use the same training set")
        transferred = evaluate_task(transfer, candidates, eval_seeds, attack=True, primary="test_accuracy",
                                    progress=progress, workers=eval_workers)
        report["transfer"] = {"task": transfer.spec, "report": transferred, "poisoning": poisoning_summary(transferred)}
    report["setup"] = {
        "budget": budget, "poisons": int(len(plan.slots)), "mode": "replace", "labels": labels,
        "train_size": int(len(plan.y)), "box": "per-feature train [min,max]", "crafting_seeds": crafting_seeds,
        "meta_steps": meta_steps, "step_size": step_size, "seeds_per_step": seeds_per_step, "objective": objective,
        "crafting_recipes": ["the task's run"], "seconds_per_training_run": unit,
        "sources": plan.sources.tolist(), "slots": plan.slots.tolist(), "input_field": pool.field,
    }
    return report


def report_text(report: Mapping, title: str) -> str:
    """The full Markdown report: the protocol table, the drop table and the transfer table."""
    setup = report["setup"]
    head = (f"{setup['poisons']} poisons ({100 * setup['budget']:g}% budget, mode **{setup['mode']}**, "
            f"labels **{setup['labels']}**), training set of {setup['train_size']}, box {setup['box']}.\n\n")
    text = report_markdown(report, title) + "\n" + head + poisoning_markdown(report["poisoning"], "Test-accuracy drop vs no poison (paired)")
    if "transfer" in report:
        t = report["transfer"]
        victim = (f"{t['config']['activation']}, width {t['config']['width']}" if "config" in t else t["task"])
        text += "\n" + poisoning_markdown(t["poisoning"], f"Transfer: the same poisons against another victim ({victim})")
    return text
