r"""Data selection: choose a training subset of a given budget from a candidate pool.

Goal (``protocols.md`` §4): given a pool of ``N`` labelled examples (possibly corrupted) and a
budget of ``k`` examples, pick the subset ``S`` (``|S| = k``) whose model, trained with the
frozen recipe for the same number of steps ``T``, is most accurate on the target distribution,
represented by the validation split. The test split is read only by
:func:`mgd.apps.protocol.evaluate`, which retrains every method's subset from scratch on fresh
evaluation seeds.

**MGD** (``method.md`` §3.3, §6). Per-example data weights ``w ∈ R^N`` enter each step's loss
as ``(1/B) Σ_{i∈B_t} w_i ℓ_i(θ_t)``. Starting at ``w = 1``, each meta-step computes the exact
metagradient ``∇_w φ`` of the validation cross-entropy ``φ`` of the final model by REPLAY
(crafting seeds rotate; by default each step averages the metagradients of two of them,
``MGDSettings.seeds_per_step``), and takes a signed step with a Bernoulli coordinate mask (the
paper's selection algorithm),

.. math:: w \leftarrow \Pi_{[0, \infty)}\big(w - \alpha\, \mathrm{sign}(\nabla_w \varphi) \odot m\big),
          \qquad m_i \sim \mathrm{Bernoulli}(p).

The **selection** is the top-``k`` of the weights of one iterate; ties (weights move in steps of
``α``) are broken by the mean weight along the trajectory up to that iterate. The iterate is
chosen on validation: each iterate's top-``k`` subset is trained once (crafting seeds rotate)
and the one with the lowest validation loss is kept. Separately, **reweighting** trains on the
whole pool with the weights of the iterate with the best weighted validation objective; that is
not a selection (it keeps every example, with continuous weights) and is reported as such.
Options: ``budget_aware`` (weights projected onto mean 1, each at most ``N/k``), ``holdout``
(the iterate chosen on a held-out part of the validation split) and ``gradient="surrogate"``
(the paper's descent direction: the whole pool injected at weight 0 into one late step,
:class:`~mgd.metaparams.PoolInjection`), none the default (``docs/select.md`` measures them).

**Pools.** A built-in preset (``RunConfig`` and a :class:`CorruptedPool`) or a user's task
(:class:`~mgd.apps.tasks.TaskRuns`: its run's training data is the pool; methods
:data:`TASK_METHODS`). Every method is written once over :class:`SelectionContext`.

**Baselines** (``protocols.md`` §7; every one returns a subset of exactly ``k`` examples):

* ``full``: the whole pool (not a selection; the "do nothing" reference point).
* ``random``: ``k`` uniformly random examples.
* ``small-loss``, ``margin``, ``el2n``: train on the pool for a fraction ``f`` of ``T`` (3
  crafting seeds, scores averaged); keep the lowest loss, the highest margin (label logit minus
  the best other logit), or the lowest EL2N ``‖softmax − onehot‖`` (Paul et al. 2021). ``f`` is
  tuned on validation from ``{0.1, 0.2, 0.3}`` (one training run per value).
* ``val-agreement``: train on the validation split only (3 crafting seeds); keep the examples
  whose label gets the highest averaged probability. It uses exactly MGD's information.
* ``tracin`` (Pruthi et al. 2020): ``Σ_c η ∇ℓ_i(θ_c) · Σ_v ∇ℓ_v(θ_c)`` over 10 evenly spaced
  checkpoints of one pool run (one forward-mode JVP per checkpoint); keep the largest.
* ``less`` (Xia et al. 2024): warm up with Adam on a random 5% of the pool (at least one
  batch) for ``T/4`` steps, 4 checkpoints; pool features are the Adam update directions of
  the per-example gradients from the stored moments, validation features plain gradients
  (randomly projected to 8192 dimensions when the model has more than 65,536 parameters);
  score = ``Σ_c η`` · cosine similarity with the validation gradients averaged within each
  class, maxed over classes; keep the largest.

Every score baseline is given its fair form: its subset is taken either by one ranking over
the pool or within each label (keeping the pool's class balance, :func:`balanced_top_k`),
whichever trains better on validation (:meth:`SelectionContext.choose_on_val`), together with
its own hyperparameters.
* ``influence`` (Koh & Liang 2017, last layer): the exact damped Hessian ``H + λI`` of the
  pool loss with respect to the head (weights and bias) at the full-pool model, penultimate
  features fixed; score ``s · ∇ℓ_i`` with ``s = (H + λI)^{-1} Σ_v ∇ℓ_v``, i.e. minus the
  influence of up-weighting ``i`` on the validation loss; keep the largest. ``λ`` is tuned on
  validation from ``{0.01, 0.1, 1}``.

**References** (reported, never "the best baseline"): ``oracle`` keeps ``k`` random clean
examples (all clean ones if fewer), using the ground truth that no method may read;
``val-only`` trains on the validation split (if it beats every selector, the task is badly
posed).

Example:
    >>> from mgd.config import RunConfig
    >>> from mgd.data import load_dataset
    >>> pool = corrupt_pool(load_dataset("digits"), label_noise=0.15, off_distribution=0.1,
    ...                     duplicates=0.1, seed=0)
    >>> report = run_selection(RunConfig(steps=30, width=16), pool, budget=0.5,
    ...                        methods=["random", "small-loss", "mgd"], mgd=MGDSettings(meta_steps=2),
    ...                        crafting_seeds=[0, 1], eval_seeds=[100, 101])  # doctest: +SKIP
    >>> sorted(report["methods"])  # doctest: +SKIP
    ['mgd-reweighting', 'mgd-selection', 'random', 'small-loss']
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mgd.apps.protocol import Candidate, Cost, check_seeds, evaluate, evaluate_task, training_run_seconds
from mgd.apps.tasks import (
    TaskRuns,
    losses_jvp,
    objective_parts,
    per_example_grads,
    per_example_logits,
    per_example_losses,
    sum_of_losses_gradient,
)
from mgd.config import RunConfig, build_problem
from mgd.corruption import label_noise as _label_noise
from mgd.corruption import near_duplicates
from mgd.corruption import off_distribution as off_distribution_fn
from mgd.data import Dataset
from mgd.descent import Box, DescentState, FixedTotal, SignedStep, descend, state_from_arrays, state_to_arrays
from mgd.errors import UserError, check_choices
from mgd.losses import Objective, labels_of
from mgd.metaparams import PoolInjection
from mgd.optim import Adam
from mgd.step import TrainingRun

__all__ = [
    "METHODS",
    "CORRUPTION_PRESETS",
    "KINDS",
    "CorruptedPool",
    "SelectionContext",
    "MGDSettings",
    "corrupt_pool",
    "top_k",
    "class_quotas",
    "balanced_top_k",
    "BALANCE",
    "adam_features",
    "rademacher_project",
    "TASK_METHODS",
    "check_task_methods",
    "loss_scores",
    "margin_scores",
    "el2n_scores",
    "agreement_scores",
    "less_scores",
    "last_layer_influence_scores",
    "select_full",
    "select_random",
    "select_by_early_training",
    "select_val_agreement",
    "select_tracin",
    "select_less",
    "select_influence",
    "select_oracle",
    "train_val_only",
    "mgd_select",
    "run_selection",
    "selection_markdown",
]

#: Method names accepted by :func:`run_selection` (``mgd`` yields both MGD candidates).
METHODS = (
    "full", "random", "small-loss", "margin", "el2n", "val-agreement", "tracin", "less",
    "influence", "mgd", "oracle", "val-only",
)
#: Corruption presets: ``mixed`` is protocol S's C2 scenario, ``noisy`` its C1.
CORRUPTION_PRESETS = {
    "none": {"label_noise": 0.0, "off_distribution": 0.0, "duplicates": 0.0},
    "noisy": {"label_noise": 0.3, "off_distribution": 0.0, "duplicates": 0.0},
    "mixed": {"label_noise": 0.15, "off_distribution": 0.1, "duplicates": 0.1},
}
#: Codes of :attr:`CorruptedPool.kind`.
KINDS = ("clean", "label-noise", "off-distribution", "duplicate")
#: :attr:`MGDSettings.gradient`: what MGD selection descends along.
GRADIENTS = ("full", "surrogate")
_EARLY_FRACTIONS = (0.1, 0.2, 0.3)
_DAMPINGS = (0.01, 0.1, 1.0)


# =========================================================================== the pool


@dataclass(frozen=True, eq=False)
class CorruptedPool:
    """A dataset whose training split is the candidate pool, and what was done to it.

    Attributes:
        dataset: the dataset with the (possibly corrupted) pool as its training split.
        kind: per pool example, an index into :data:`KINDS` (0 = clean). Ground truth for
            diagnostics only; no method but the ``oracle`` reference reads it.
        rates: the corruption rates and seed applied.
    """

    dataset: Dataset
    kind: np.ndarray
    rates: dict

    @property
    def clean(self) -> np.ndarray:
        return self.kind == 0

    def composition(self, indices: np.ndarray) -> dict:
        """Counts per kind of the examples ``indices`` and the precision (fraction clean)."""
        kinds = self.kind[np.asarray(indices, dtype=np.int64)]
        counts = {name: int((kinds == code).sum()) for code, name in enumerate(KINDS)}
        return {"precision": float(counts["clean"] / max(1, len(kinds))), "counts": counts}


def corrupt_pool(
    dataset: Dataset,
    *,
    label_noise: float = 0.0,
    off_distribution: float = 0.0,
    duplicates: float = 0.0,
    seed: int = 0,
) -> CorruptedPool:
    """Corrupt a dataset's training split (the pool) once, with a fixed seed.

    The three corruptions hit disjoint examples, in this order: ``label_noise`` (a uniformly
    wrong label), ``off_distribution`` (permuted/inverted or noised inputs with random labels,
    :func:`mgd.corruption.off_distribution`) and ``duplicates`` (near-copies of a few clean
    examples, :func:`mgd.corruption.near_duplicates`). Each rate is a fraction of the whole pool;
    validation and test splits are untouched.
    """
    total = label_noise + off_distribution + duplicates
    if total >= 1.0:
        raise UserError(f"corruption rates add up to {total:g}; they must leave some of the pool clean (< 1)")
    x, y = dataset.x_train, dataset.y_train
    kind = np.zeros(len(y), dtype=np.int64)
    if label_noise:
        y, mask = _label_noise(y, label_noise, dataset.num_classes, seed=seed)
        kind[mask] = 1
    if off_distribution:
        x, y, mask = off_distribution_fn(x, y, off_distribution, dataset.num_classes, seed=seed, exclude=kind > 0)
        kind[mask] = 2
    if duplicates:
        x, y, mask = near_duplicates(x, y, duplicates, seed=seed, exclude=kind > 0)
        kind[mask] = 3
    rates = {"label_noise": label_noise, "off_distribution": off_distribution, "duplicates": duplicates, "seed": seed}
    return CorruptedPool(replace(dataset, x_train=np.ascontiguousarray(x), y_train=np.ascontiguousarray(y)), kind, rates)



# =========================================================================== scores (pure)


def top_k(scores: np.ndarray, k: int, *, largest: bool = True, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` best scores (sorted), ties broken by ``tiebreak`` then by index.

    ``tiebreak`` is compared in the same direction as ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 1 <= k <= len(scores):
        raise UserError(f"cannot keep {k} of {len(scores)} examples")
    sign = -1.0 if largest else 1.0
    keys = [np.arange(len(scores))]
    if tiebreak is not None:
        keys.append(sign * np.asarray(tiebreak, dtype=np.float64))
    keys.append(sign * scores)
    order = np.lexsort(keys)  # the last key is the primary one
    return np.sort(order[:k])


def ranking(scores: np.ndarray, *, largest: bool = True, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """All indices from most to least preferred (for precision-vs-budget diagnostics)."""
    sign = -1.0 if largest else 1.0
    keys = [np.arange(len(scores))]
    if tiebreak is not None:
        keys.append(sign * np.asarray(tiebreak, dtype=np.float64))
    keys.append(sign * np.asarray(scores, dtype=np.float64))
    return np.lexsort(keys)


def class_quotas(labels: np.ndarray, k: int) -> dict[int, int]:
    """How many of ``k`` examples each (observed) label gets, in proportion to its count.

    Largest-remainder rounding, ties by label, so the quotas sum to ``k`` exactly and no class
    gets more than it has.
    """
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    exact = k * counts / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    for i in np.lexsort((classes, -(exact - quotas)))[: k - int(quotas.sum())]:
        quotas[i] += 1
    return {int(c): int(q) for c, q in zip(classes, quotas)}


def balanced_top_k(scores: np.ndarray, labels: np.ndarray, k: int, *, largest: bool = True,
                   tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The best ``k`` scores *within each label*, each label keeping its share of the pool
    (:func:`class_quotas`).

    A score that ranks examples across classes (a loss, a margin, a gradient similarity) can
    keep mostly the easy classes, and a training set missing a class trains badly however clean
    it is; ranking within each label (the label the pool gives, as no method sees the truth)
    keeps the class balance of the pool.
    """
    labels = np.asarray(labels)
    if not 1 <= k <= len(labels):
        raise UserError(f"cannot keep {k} of {len(labels)} examples")
    kept = []
    for label, quota in class_quotas(labels, k).items():
        members = np.flatnonzero(labels == label)
        if quota:
            local = top_k(np.asarray(scores)[members], quota, largest=largest,
                          tiebreak=None if tiebreak is None else np.asarray(tiebreak)[members])
            kept.append(members[local])
    return np.sort(np.concatenate(kept))


#: How a baseline turns its scores into a subset: one ranking over the pool, or per label.
BALANCE = ("global", "per-class")


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy ``−log softmax(logits)_y`` (keep the *lowest*)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return F.cross_entropy(logits, torch.as_tensor(labels), reduction="none").numpy()


def margin_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label logit minus the largest other logit (keep the *highest*)."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    own = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return own - others.max(axis=1)


def el2n_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N, ``‖softmax(logits) − onehot(y)‖₂`` (Paul et al. 2021; keep the *lowest* on noisy pools)."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    probs[np.arange(len(labels)), labels] -= 1.0
    return np.linalg.norm(probs, axis=1)


def agreement_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Probability a (validation-trained) model gives each example's label (keep the *highest*)."""
    return np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]


def less_scores(
    train_grads: Sequence[np.ndarray | Tensor],
    val_grads: Sequence[np.ndarray | Tensor],
    val_labels: np.ndarray,
    lrs: Sequence[float],
) -> np.ndarray:
    r"""LESS scores from per-example gradient features at several checkpoints.

    .. math:: s_i = \max_c \sum_j \eta_j \, \hat g_{ij} \cdot \frac{1}{|V_c|}\sum_{v \in V_c} \hat g_{vj},
              \qquad \hat g = g / \lVert g \rVert,

    i.e. the learning-rate-weighted cosine similarity with the validation examples of class
    ``c`` (a "subtask"), maxed over classes (Xia et al. 2024, Eq. 2).

    Args:
        train_grads: per checkpoint, an ``(N, P)`` array of pool gradient features.
        val_grads: per checkpoint, an ``(M, P)`` array of validation gradients.
        val_labels: the ``M`` validation labels (subtasks).
        lrs: per checkpoint, the learning rate ``η_j``.
    """
    classes = np.unique(val_labels)
    total = None
    for g_train, g_val, lr in zip(train_grads, val_grads, lrs):
        g_train = torch.as_tensor(g_train, dtype=torch.float64)
        g_val = torch.as_tensor(g_val, dtype=torch.float64)
        unit_train = g_train / g_train.norm(dim=1, keepdim=True).clamp_min(1e-30)
        unit_val = g_val / g_val.norm(dim=1, keepdim=True).clamp_min(1e-30)
        labels = torch.as_tensor(val_labels)
        centroids = torch.stack([unit_val[labels == c].mean(dim=0) for c in classes])  # (C, P)
        part = lr * (unit_train @ centroids.T)  # (N, C)
        total = part if total is None else total + part
    return total.max(dim=1).values.numpy()


def last_layer_influence_scores(
    weight: Tensor,
    bias: Tensor,
    pool_features: Tensor,
    pool_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    damping: float,
    logit_scale: float = 1.0,
) -> np.ndarray:
    r"""Influence-function scores restricted to a linear softmax head (exact damped Hessian).

    With head parameters ``u = (W, b)`` and features ``φ̃ = (φ, 1)``, logits are
    ``s (W φ + b)``; the per-example gradient is ``s (p − e_y) ⊗ φ̃`` and the Hessian of the mean
    pool loss is ``s² mean_i (diag p_i − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ``. The score is

    .. math:: \mathrm{score}_i = s^\top \nabla_u \ell_i, \qquad s = (H + \lambda I)^{-1} \sum_{v} \nabla_u \ell_v,

    which is minus Koh & Liang's influence of up-weighting ``i`` on the validation loss: a large
    score means training more on ``i`` lowers the validation loss. Keep the *highest*.
    """
    dtype = torch.float64

    def augmented(f: Tensor) -> Tensor:
        f = f.to(dtype)
        return torch.cat([f, torch.ones(len(f), 1, dtype=dtype)], dim=1)

    def grads_and_probs(f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = logit_scale * (f @ torch.cat([weight, bias[:, None]], dim=1).to(dtype).T)
        probs = torch.softmax(logits, dim=1)
        residual = probs - F.one_hot(y, probs.shape[1]).to(dtype)
        return logit_scale * torch.einsum("nc,nd->ncd", residual, f).reshape(len(f), -1), probs

    fp, fv = augmented(pool_features), augmented(val_features)
    pool_grads, probs = grads_and_probs(fp, pool_labels)
    val_grads, _ = grads_and_probs(fv, val_labels)
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, C, C)
    c, d = probs.shape[1], fp.shape[1]
    hessian = logit_scale**2 * torch.einsum("nab,ni,nj->aibj", curvature, fp, fp).reshape(c * d, c * d) / len(fp)
    s = torch.linalg.solve(hessian + damping * torch.eye(c * d, dtype=dtype), val_grads.sum(dim=0))
    return (pool_grads @ s).numpy()


# =========================================================================== training helpers


@dataclass
class SelectionContext:
    """What every selection method gets: the pool, the budget, the crafting seeds.

    The pool is either a built-in preset (``config`` and a :class:`CorruptedPool`) or a user's
    task (``runs``, a :class:`~mgd.apps.tasks.TaskRuns`: its training data is the pool). The
    methods use only :meth:`make`, :meth:`subset_val_loss`, :meth:`candidate` and the pool's
    :attr:`labels`, so each is written once for both. ``run_seconds`` is the measured time of
    one training run on the pool, the unit of the "training-run equivalents" reported as cost.
    """

    config: RunConfig | None
    pool: CorruptedPool | None
    k: int
    crafting_seeds: Sequence[int]
    run_seconds: float = float("nan")
    runs: TaskRuns | None = None

    @property
    def dataset(self) -> Dataset:
        return self.pool.dataset

    @property
    def size(self) -> int:
        return self.runs.size if self.runs is not None else len(self.dataset.y_train)

    @property
    def labels(self) -> np.ndarray | None:
        """The pool's class labels (``None`` for a task whose run does not classify)."""
        return self.runs.labels if self.runs is not None else self.dataset.y_train

    @property
    def ground_truth(self) -> np.ndarray | None:
        """Per pool example, its corruption kind (diagnostics only; ``None`` for a user's pool)."""
        return self.pool.kind if self.pool is not None else None

    def make(self, seed: int, indices: np.ndarray | None = None, *, steps: int | None = None,
             adam_lr: float | None = None, on_validation: bool = False) -> tuple[TrainingRun, Callable]:
        """``(run, validation objective)`` of the recipe with ``seed``: on the pool, on its subset
        ``indices``, or on the validation data (``on_validation``); ``steps`` and an Adam
        optimizer with learning rate ``adam_lr`` replace the recipe's when given."""
        if self.runs is not None:
            return self.runs.make(seed, indices, steps=None if steps is None else max(1, steps),
                                  optimizer=Adam() if adam_lr is not None else None, lr=adam_lr,
                                  on_objective_data=on_validation)
        ds = self.dataset
        if on_validation:
            x, y = ds.x_val, ds.y_val
        elif indices is None:
            x, y = ds.x_train, ds.y_train
        else:
            x, y = ds.x_train[indices], ds.y_train[indices]
        config = self.config
        if adam_lr is not None:
            config = replace(config, optimizer="adam", lr=adam_lr, momentum=0.0, nesterov=False)
        changes = {"seed": seed, "label_noise": 0.0, "batch_size": min(config.batch_size, len(y))}
        if steps is not None:
            changes["steps"] = max(1, steps)
        problem = build_problem(RunConfig(**{**config.to_dict(), **changes}), dataset=replace(ds, x_train=x, y_train=y))
        return problem.trainer, problem.val_objective()

    def subset_val_loss(self, indices: np.ndarray | None, seed: int, meta: Mapping[str, Tensor] | None = None) -> dict:
        """Train on the pool subset ``indices`` with ``seed``; validation loss (and accuracy)."""
        run, objective = self.make(seed, indices)
        final = run.run(meta or {})
        if self.runs is not None:
            return self.runs.validation(run, objective, final)
        ds = self.dataset
        x_val = torch.as_tensor(ds.x_val, dtype=run.dtype, device=run.device)
        y_val = torch.as_tensor(ds.y_val, device=run.device)
        with torch.no_grad():
            logits = run.predict(final.params, final.buffers, x_val)
            loss = float(F.cross_entropy(logits.double(), y_val))
            acc = float((logits.argmax(1) == y_val).double().mean())
        return {"val_loss": loss, "val_accuracy": acc}

    def better_on_val(self, scores: Sequence[dict]) -> int:
        """Index of the best validation result: accuracy then loss for a preset; the task's
        objective (what MGD optimises) for a task."""
        if self.runs is not None:
            return min(range(len(scores)), key=lambda i: (scores[i]["val_loss"], i))
        return max(range(len(scores)), key=lambda i: (scores[i]["val_accuracy"], -scores[i]["val_loss"], -i))

    def candidate(self, name: str, indices: np.ndarray | None, started: float, *, kind: str = "baseline",
                  order: np.ndarray | None = None, info: dict | None = None) -> Candidate:
        """A subset candidate (``indices``; ``None``: the whole pool) with its cost (since
        ``started``) and diagnostics."""
        everything = indices is None
        indices = np.arange(self.size) if everything else np.sort(np.asarray(indices, dtype=np.int64))
        seconds = time.perf_counter() - started
        diagnostics = {"selection": "whole pool" if everything else "subset", **(info or {})}
        if self.pool is not None:
            diagnostics.update(self.pool.composition(indices))
        if order is not None:
            diagnostics["order"] = np.asarray(order, dtype=np.int64)  # stored as an array, not in JSON
        cost = Cost(seconds, seconds / self.run_seconds if self.run_seconds > 0 else float("nan"))
        if self.runs is not None:
            return Candidate(name, subset=None if everything else indices, cost=cost, kind=kind, info=diagnostics)
        return Candidate(name, x_train=self.dataset.x_train[indices], y_train=self.dataset.y_train[indices],
                         cost=cost, kind=kind, info=diagnostics)

    def choose_on_val(self, name: str, options: Sequence[tuple[dict, np.ndarray, bool]], started: float, *,
                      info: dict | None = None) -> Candidate:
        """The best of a baseline's forms, chosen on validation.

        ``options`` are ``(hyperparameters, scores, keep the largest?)``. Each option's scores
        become a subset in both forms of :data:`BALANCE` (one ranking over the pool, or per
        label; a pool without labels has only the first); each subset is trained once (the
        first crafting seed) and the best on validation (:meth:`better_on_val`) is kept. That
        is up to ``2 × len(options)`` training runs of tuning, counted in the cost, and no test
        data.
        """
        labels = self.labels
        trials = []
        for hyper, scores, largest in options:
            for balance in BALANCE if labels is not None else BALANCE[:1]:
                indices = (top_k(scores, self.k, largest=largest) if balance == "global"
                           else balanced_top_k(scores, labels, self.k, largest=largest))
                val = self.subset_val_loss(indices, self.crafting_seeds[0])
                trials.append(({**hyper, "balance": balance}, scores, largest, indices, val))
        hyper, scores, largest, indices, _ = trials[self.better_on_val([t[4] for t in trials])]
        tuning = {", ".join(f"{k}={v}" for k, v in t[0].items()): t[4] for t in trials}
        return self.candidate(name, indices, started, order=ranking(scores, largest=largest),
                              info={"hyperparameters": hyper, "tuning_on_val": tuning, **(info or {})})

    def require_labels(self, method: str) -> np.ndarray:
        if self.labels is None:
            raise UserError(
                f"{method} needs class labels and logits, and the task's run does not classify (its "
                "batches carry no labels or its outputs are not (batch, classes) logits); drop it from --methods"
            )
        return self.labels


# =========================================================================== baselines


def select_full(ctx: SelectionContext) -> Candidate:
    """The whole pool (not a selection: its size is ``N``, not ``k``)."""
    return ctx.candidate("full", None, time.perf_counter())


def select_random(ctx: SelectionContext) -> Candidate:
    """``k`` uniformly random pool examples (first crafting seed)."""
    started = time.perf_counter()
    rng = np.random.default_rng([ctx.crafting_seeds[0], 0x5E1])
    order = rng.permutation(ctx.size)
    return ctx.candidate("random", order[: ctx.k], started, order=order)


_EARLY_SCORES = {  # name -> (score function of (logits, labels), keep the largest?)
    "small-loss": (loss_scores, False),
    "margin": (margin_scores, True),
    "el2n": (el2n_scores, False),
}


def early_outputs(ctx: SelectionContext, fractions: Sequence[float], seeds: Sequence[int], *,
                  logits: bool) -> dict[float, np.ndarray]:
    """Pool logits (``logits=True``) or per-example training losses after ``round(f · T)``
    steps for each fraction, averaged over seeds."""
    sums: dict[float, np.ndarray] = {}
    for seed in seeds:
        run, _ = ctx.make(seed)
        steps = {f: max(1, int(round(f * run.steps))) for f in fractions}
        state = None
        for f in sorted(fractions):
            state = run.run(state=state, until=steps[f])
            value = per_example_logits(run, state) if logits else per_example_losses(run, state)
            sums[f] = value if f not in sums else sums[f] + value
    return {f: s / len(seeds) for f, s in sums.items()}


def select_by_early_training(
    ctx: SelectionContext, methods: Sequence[str], *, fractions: Sequence[float] = _EARLY_FRACTIONS
) -> list[Candidate]:
    """``small-loss``, ``margin`` and ``el2n`` from one set of early-training runs.

    The pool is trained on for ``f · T`` steps with 3 crafting seeds (logits averaged; for a
    task that does not classify, ``small-loss`` averages its own per-example losses). For each
    method, ``f`` and the balance of the subset (:data:`BALANCE`) are chosen on validation by
    :meth:`SelectionContext.choose_on_val`: ``2 × len(fractions)`` training runs per method.
    """
    started = time.perf_counter()
    labels = ctx.labels
    for name in methods:
        if name != "small-loss":
            ctx.require_labels(name)
    outputs = early_outputs(ctx, fractions, list(ctx.crafting_seeds[:3]), logits=labels is not None)
    shared = time.perf_counter() - started
    out = []
    for name in methods:
        method_started = time.perf_counter() - shared / len(methods)
        score_fn, largest = _EARLY_SCORES[name]
        options = [({"train_fraction": f}, score_fn(outputs[f], labels) if labels is not None else outputs[f], largest)
                   for f in fractions]
        out.append(ctx.choose_on_val(name, options, method_started))
    return out


def select_val_agreement(ctx: SelectionContext) -> Candidate:
    """Train on validation only (3 crafting seeds, the recipe's ``T``); keep the pool examples
    whose label gets the highest averaged probability (globally or per label, chosen on
    validation)."""
    started = time.perf_counter()
    labels = ctx.require_labels("val-agreement")
    pool_data = ctx.make(ctx.crafting_seeds[0])[0].data
    probs = 0.0
    seeds = list(ctx.crafting_seeds[:3])
    for seed in seeds:
        run, _ = ctx.make(seed, on_validation=True)
        final = run.run()
        probs = probs + torch.softmax(torch.as_tensor(per_example_logits(run, final, pool_data)), dim=1).numpy()
    scores = agreement_scores(probs / len(seeds), labels)
    return ctx.choose_on_val("val-agreement", [({}, scores, True)], started)


def _checkpoints(run: TrainingRun, count: int) -> list:
    """States at ``count`` evenly spaced steps of one run (the last is the final state)."""
    marks = sorted({max(1, int(round(run.steps * (j + 1) / count))) for j in range(count)})
    states, state = [], None
    for mark in marks:
        state = run.run(state=state, until=mark)
        states.append(state)
    return states


def select_tracin(ctx: SelectionContext, *, checkpoints: int = 10) -> Candidate:
    """TracIn with ``checkpoints`` evenly spaced checkpoints of one pool run (seed 0, fixed
    a priori). ``∇ℓ_i · G`` for all ``i`` is one forward-mode JVP along ``G = Σ_v ∇ℓ_v``."""
    started = time.perf_counter()
    run, objective = ctx.make(ctx.crafting_seeds[0])
    val = objective_parts(objective, "tracin")
    scores = np.zeros(ctx.size)
    for state in _checkpoints(run, checkpoints):
        direction = sum_of_losses_gradient(run, state.params, state.buffers, val.data, val.loss)
        scores += run.lr * losses_jvp(run, state.params, state.buffers, direction)
    return ctx.choose_on_val("tracin", [({"checkpoints": checkpoints}, scores, True)], started)


def adam_features(grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float = 0.9,
                  beta2: float = 0.999, eps: float = 1e-8) -> Tensor:
    r"""LESS's Adam-preconditioned gradient features (Xia et al. 2024, §3 and its code).

    For per-example gradients ``g`` (rows) and the warm-up optimizer's stored moments
    ``m, v`` at a checkpoint, the feature is the direction Adam would step in were ``g`` the
    next gradient:

    .. math:: m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
              \Gamma(g) = m' / \sqrt{v' + \epsilon},

    without bias correction, ``ε`` inside the root, as LESS computes it.
    """
    m = beta1 * exp_avg + (1.0 - beta1) * grads
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grads * grads
    return m / torch.sqrt(v + eps)


def rademacher_project(features: Tensor, dim: int, *, seed: int, chunk: int = 4096) -> Tensor:
    """``features @ R / √dim`` with a seeded ``±1`` matrix ``R`` of shape ``(P, dim)``, built
    ``chunk`` rows at a time so that ``R`` is never held whole (LESS's random projection;
    inner products are kept in expectation, Johnson-Lindenstrauss)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.zeros(len(features), dim, dtype=features.dtype, device=features.device)
    for start in range(0, features.shape[1], chunk):
        block = features[:, start : start + chunk]
        signs = torch.randint(0, 2, (block.shape[1], dim), generator=generator).to(features) * 2 - 1
        out += block @ signs
    return out / math.sqrt(dim)


#: Gradient features longer than this are randomly projected to :data:`LESS_PROJECTION` dims.
LESS_MAX_FEATURES = 65536
LESS_PROJECTION = 8192


def select_less(ctx: SelectionContext, *, warmup_fraction: float = 0.05, checkpoints: int = 4,
                warmup_lr: float = 1e-3) -> Candidate:
    """LESS (see the module doc): warm up with Adam on a random ``warmup_fraction`` of the pool
    (at least one batch) for ``T/4`` steps; at ``checkpoints`` evenly spaced checkpoints, pool
    features are Adam directions (:func:`adam_features`) and validation features plain
    gradients, projected when long (:func:`rademacher_project`); the score is LESS's
    (:func:`less_scores`). Warm-up settings are fixed a priori; the balance of the subset is
    chosen on validation."""
    started = time.perf_counter()
    n = ctx.size
    pool_run, _ = ctx.make(ctx.crafting_seeds[0])
    rng = np.random.default_rng([ctx.crafting_seeds[0], 0x1E55])
    size = min(n, max(int(round(warmup_fraction * n)), pool_run.batch_size))
    warm = np.sort(rng.choice(n, size=size, replace=False))
    run, objective = ctx.make(ctx.crafting_seeds[0], warm, steps=max(checkpoints, pool_run.steps // 4),
                              adam_lr=warmup_lr)
    val = objective_parts(objective, "less")
    val_labels = (np.asarray(labels_of(val.data.batch(torch.arange(len(val.data)))).cpu(), dtype=np.int64)
                  if ctx.labels is not None else np.zeros(len(val.data), dtype=np.int64))
    project = run.num_params > LESS_MAX_FEATURES
    train_features, val_features = [], []
    for j, state in enumerate(_checkpoints(run, checkpoints)):
        exp_avg, exp_avg_sq = state.opt_state
        seed = int(np.random.default_rng([ctx.crafting_seeds[0], 0x1E55, j]).integers(2**62))

        def projected(g: Tensor) -> Tensor:  # the same projection for both, a new one per checkpoint
            return rademacher_project(g, LESS_PROJECTION, seed=seed) if project else g

        train_features.append(per_example_grads(
            run, state.params, state.buffers, pool_run.data,
            transform=lambda g: projected(adam_features(g, exp_avg, exp_avg_sq))))
        val_features.append(per_example_grads(run, state.params, state.buffers, val.data, val.loss,
                                              transform=projected))
    scores = less_scores(train_features, val_features, val_labels, [warmup_lr] * len(train_features))
    hyper = {"warmup_examples": int(size), "checkpoints": checkpoints, "warmup_steps": run.steps,
             "warmup_optimizer": f"adam, lr {warmup_lr:g}",
             "projection": LESS_PROJECTION if project else "none"}
    return ctx.choose_on_val("less", [(hyper, scores, True)], started)


def _head_and_features(run: TrainingRun, state, x: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """The last linear layer's weight and bias, its inputs on ``x``, and the logit scale."""
    model = run.model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise UserError("last-layer influence needs a model whose head is a linear layer")
    name, head = linears[-1]
    scale = float(getattr(model[-1], "factor", 1.0)) if isinstance(model, torch.nn.Sequential) else 1.0
    captured = []
    # on the run's private copy of the model, which is what evaluation runs
    copy_head = run.stateless.module.get_submodule(name)
    handle = copy_head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    try:
        run.predict(state.params.detach(), state.buffers.detach(), x)
    finally:
        handle.remove()
    named = run.named_tensors(state.params.detach(), state.buffers.detach())
    return named[f"{name}.weight"], named[f"{name}.bias"], captured[0], scale


def _preset_only(ctx: SelectionContext, method: str) -> None:
    if ctx.pool is None:
        raise UserError(f"{method} is available for the built-in presets only; drop it from --methods")


def select_influence(ctx: SelectionContext, *, dampings: Sequence[float] = _DAMPINGS) -> Candidate:
    """Last-layer influence functions at the full-pool model (seed 0); the damping ``λ`` and
    the balance are tuned on validation (:meth:`SelectionContext.choose_on_val`). Presets only
    (it needs the classifier's linear head on fixed features)."""
    _preset_only(ctx, "influence")
    started = time.perf_counter()
    run, _ = ctx.make(ctx.crafting_seeds[0])
    final = run.run()
    ds = ctx.dataset
    x_pool, y_pool = run.x_train, run.y_train
    x_val = torch.as_tensor(ds.x_val, dtype=run.dtype, device=run.device)
    y_val = torch.as_tensor(ds.y_val, device=run.device)
    with torch.no_grad():
        weight, bias, pool_features, scale = _head_and_features(run, final, x_pool)
        _, _, val_features, _ = _head_and_features(run, final, x_val)
    options = [
        ({"damping": damping},
         last_layer_influence_scores(weight, bias, pool_features, y_pool, val_features, y_val,
                                     damping=damping, logit_scale=scale),
         True)
        for damping in dampings
    ]
    return ctx.choose_on_val("influence", options, started)


def select_oracle(ctx: SelectionContext) -> Candidate:
    """Reference: ``k`` random *clean* examples (all of them if fewer), by the ground truth."""
    _preset_only(ctx, "oracle (it reads the corruption's ground truth)")
    started = time.perf_counter()
    rng = np.random.default_rng([ctx.crafting_seeds[0], 0x0AC])
    clean = rng.permutation(np.flatnonzero(ctx.pool.clean))
    return ctx.candidate("oracle", clean[: ctx.k], started, kind="reference")


def train_val_only(ctx: SelectionContext) -> Candidate:
    """Reference: train on the validation split alone (its validation numbers are meaningless)."""
    _preset_only(ctx, "val-only")
    return Candidate("val-only", x_train=ctx.dataset.x_val, y_train=ctx.dataset.y_val, kind="reference",
                     info={"selection": "validation split, not the pool"})


# =========================================================================== MGD


@dataclass(frozen=True)
class MGDSettings:
    """MGD's hyperparameters (tuned on validation only; see ``docs/select.md``)."""

    meta_steps: int = 20
    step_size: float = 0.2
    mask_prob: float = 0.5
    replay_k: int | None = None
    #: crafting seeds whose metagradients are averaged at each meta-step (2: chosen on the
    #: validation accuracy of development runs, docs/select.md)
    seeds_per_step: int = 2
    #: training runs (seeds) averaged when scoring each iterate's top-k subset on validation
    subset_seeds: int = 1
    #: keep the weights on the budget throughout: mean 1, each at most N/k (see mgd_select)
    budget_aware: bool = False
    #: fraction of the validation split held out from the metagradient and used only to
    #: choose the iterate (0: the whole split serves both)
    holdout: float = 0.0
    #: the descent direction: ``"full"``, the metagradient of the weights through every step;
    #: ``"surrogate"``, the paper's one-step surrogate (:class:`~mgd.metaparams.PoolInjection`
    #: at step ``round(inject_at · T)``, which also scores examples whose weight is 0)
    gradient: str = "full"
    inject_at: float = 0.9

    def __post_init__(self) -> None:
        if self.gradient not in GRADIENTS:
            raise UserError(f"unknown MGD selection gradient {self.gradient!r}; choose one of {', '.join(GRADIENTS)}")
        if not 0.0 <= self.inject_at < 1.0:
            raise UserError(f"the injection step must be a fraction of training in [0, 1), got {self.inject_at}")

    def to_dict(self) -> dict:
        return {"meta_steps": self.meta_steps, "step_size": self.step_size, "mask_prob": self.mask_prob,
                "replay_k": self.replay_k, "seeds_per_step": self.seeds_per_step,
                "subset_seeds": self.subset_seeds, "budget_aware": self.budget_aware,
                "holdout": self.holdout, "gradient": self.gradient, "inject_at": self.inject_at}


def _weight_by_kind(ctx: SelectionContext, w: np.ndarray) -> dict:
    """Mean weight per corruption kind (ground truth: diagnostics only; empty for a user's pool)."""
    kind = ctx.ground_truth
    if kind is None:
        return {}
    return {name: float(w[kind == code].mean()) for code, name in enumerate(KINDS) if (kind == code).any()}


def _split_validation(ctx: SelectionContext, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(crafting part, held-out part)`` of the validation examples: a seeded split, stratified
    by label when the validation data has labels, ``fraction`` of each class held out."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the validation hold-out must be a fraction in (0, 1), got {fraction}")
    objective = objective_parts(ctx.make(ctx.crafting_seeds[0])[1], "a validation hold-out")
    n = len(objective.data)
    try:
        labels = labels_of(objective.data.batch(torch.arange(n))).cpu().numpy()
    except UserError:
        labels = np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([ctx.crafting_seeds[0], 0x401D])
    held = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held.extend(members[: max(1, int(round(fraction * len(members))))])
    held = np.sort(np.asarray(held, dtype=np.int64))
    crafting = np.setdiff1d(np.arange(n), held)
    if len(crafting) == 0:
        raise UserError("the validation hold-out leaves no validation example to differentiate; lower it")
    return crafting, held


def _objective_on(objective, indices: np.ndarray):
    """The same objective on the validation examples at ``indices`` only."""
    val = objective_parts(objective, "a validation hold-out")
    return Objective(val.model, val.data.take(torch.as_tensor(indices)), loss=val.loss,
                     batch_size=min(val.batch_size, len(indices)), inputs=val.inputs)


def _with_injection(make: Callable[[int], tuple[TrainingRun, Callable]], step: int):
    """``make`` with :class:`~mgd.metaparams.PoolInjection` at ``step`` added to each run."""

    def injected(seed: int):
        run, objective = make(seed)
        return run.replaced(metaparams=[*run.metaparams.values(), PoolInjection(step)]), objective

    return injected


def mgd_select(
    ctx: SelectionContext,
    settings: MGDSettings = MGDSettings(),
    *,
    store=None,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[Candidate, Candidate, list[dict]]:
    """MGD on per-example data weights, then a top-``k`` selection (see the module doc).

    ``store``: a :class:`~mgd.runs.RunDirectory`; the descent is saved there after every
    meta-step (``mgd_state.npz``, one atomic file: the optimizer state, every iterate and the
    history), and a killed run continues from it with the same results.

    Returns:
        ``(selection, reweighting, history)``: the top-``k`` subset of the iterate whose subset
        has the lowest validation loss; the whole pool with the weights of the iterate with the
        best weighted validation objective (a reweighting, not a selection); and per meta-step
        records (validation objective, the subset's validation loss, mean weight per corruption
        kind as a diagnostic).
    """
    started = time.perf_counter()
    seeds = list(ctx.crafting_seeds)
    base, _ = ctx.make(seeds[0])
    if "data_weights" not in base.metaparams:
        raise UserError("MGD selection needs the data_weights metaparameter; add 'data_weights' to "
                        "metaparams=[...] in the task function")
    z0 = {"data_weights": torch.ones(ctx.size, dtype=base.dtype, device=base.device)}
    make, subset_score = ctx.make, ctx.subset_val_loss
    if settings.holdout:
        # MGD overfits the split it differentiates (docs/robustness.md: validation accuracy far
        # above test): differentiate one part and choose the iterate on the other.
        crafting_part, held_part = _split_validation(ctx, settings.holdout)

        def make(seed: int):
            run, objective = ctx.make(seed)
            return run, _objective_on(objective, crafting_part)

        def subset_score(indices: np.ndarray, seed: int) -> dict:
            run, objective = ctx.make(seed, indices)
            final = run.run()
            with torch.no_grad():
                held = _objective_on(objective, held_part)(run.named_tensors(final.params, final.buffers))
            return {"val_loss": float(held)}
    gradient_from, horizon = None, None
    if settings.gradient == "surrogate":
        # The paper's surrogate: at z = 0 the injection leaves every run as it was, and its
        # metagradient scores all N examples at one late step, only that step onward replayed.
        t_inj = min(base.steps - 1, int(round(settings.inject_at * base.steps)))
        gradient_from, horizon = {"data_weights": PoolInjection.name}, base.steps - t_inj
        make = _with_injection(make, t_inj)
    iterates: list[np.ndarray] = []
    history: list[dict] = []
    state = None
    if store is not None and (store.path / "mgd_state.npz").is_file():
        from mgd.io import load_npz

        arrays = load_npz(store.path / "mgd_state.npz", what=f"--resume {store.path}")
        saved = json.loads(arrays["json"].tobytes().decode())
        state = state_from_arrays({k: v for k, v in arrays.items() if k not in ("iterates", "json")},
                                  saved["state"], like=z0)
        iterates = list(arrays["iterates"][: state.step])
        history = saved["history"][: state.step]
        if progress is not None:
            progress("meta", state.step)

    def on_step(record, new_state: DescentState) -> None:
        w = record.iterate["data_weights"].detach().cpu().numpy().astype(np.float64)
        iterates.append(w)
        history.append({"step": record.step, "seed": record.seed, "val_objective": record.value,
                        "seconds": record.seconds, "mean_weight_by_kind": _weight_by_kind(ctx, w)})
        if store is not None:  # one file, replaced atomically: never half a save
            arrays, meta = state_to_arrays(new_state)
            record_bytes = np.frombuffer(json.dumps({"state": meta, "history": history}).encode(), dtype=np.uint8)
            store.write_npz("mgd_state.npz", {**arrays, "iterates": np.stack(iterates), "json": record_bytes})

    optimizer = SignedStep(settings.step_size, settings.mask_prob, mask_seed=seeds[0])
    # Budget-aware: project onto {0 ≤ w ≤ N/k, Σ w = N}. A subset of k examples at weight N/k
    # (the rest 0) is a vertex of that set, and a run with those weights matches training on
    # the subset in expectation (each batch's loss (1/B) Σ w_i ℓ_i averages the subset's
    # losses), so the metagradient is taken near the runs the top-k will become.
    projection = (FixedTotal(float(ctx.size), upper=ctx.size / ctx.k) if settings.budget_aware
                  else Box(0.0, None))
    state = descend(make, z0, optimizer=optimizer, projections={"data_weights": projection},
                    steps=settings.meta_steps, seeds=seeds, k=settings.replay_k, seeds_per_step=settings.seeds_per_step,
                    gradient_from=gradient_from, horizon=horizon, state=state, on_step=on_step, progress=progress)
    mgd_seconds = time.perf_counter() - started

    # Choose the iterate for selection on validation: train each iterate's top-k subset.
    trajectory = np.cumsum(np.stack(iterates), axis=0)
    subsets, scores = [], []
    for i, w in enumerate(iterates):
        indices = top_k(w, ctx.k, tiebreak=trajectory[i] / (i + 1))
        runs = [subset_score(indices, seeds[(i + j) % len(seeds)]) for j in range(settings.subset_seeds)]
        score = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
        history[i].update({f"subset_{key}": value for key, value in score.items()})
        if ctx.pool is not None:
            history[i]["subset_precision"] = ctx.pool.composition(indices)["precision"]
        subsets.append(indices)
        scores.append({"val_loss": score["val_loss"]})  # the iterate is chosen by validation loss
    chosen = min(range(len(iterates)), key=lambda i: (scores[i]["val_loss"], i))
    selection = ctx.candidate(
        "mgd-selection", subsets[chosen], started, kind="mgd",
        order=ranking(iterates[chosen], tiebreak=trajectory[chosen] / (chosen + 1)),
        info={"chosen_iterate": chosen, "hyperparameters": settings.to_dict()},
    )
    weights = state.best_z["data_weights"].detach().cpu().numpy().astype(np.float64)
    info = {"selection": "reweighting (whole pool, continuous weights; not a subset)",
            "chosen_iterate": state.best_step, "hyperparameters": settings.to_dict()}
    if ctx.ground_truth is not None:
        info["mean_weight_by_kind"] = history[state.best_step]["mean_weight_by_kind"]
    reweighting = Candidate(
        "mgd-reweighting", meta={"data_weights": weights},
        cost=Cost(mgd_seconds, mgd_seconds / ctx.run_seconds if ctx.run_seconds > 0 else float("nan")),
        kind="mgd", info=info,
    )
    return selection, reweighting, history


# =========================================================================== the whole run


def _budget_k(budget: float, n: int) -> int:
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
        raise UserError(f"the budget must be a fraction in (0, 1] of the pool, got {budget}")
    k = int(round(budget * n))
    if k < 1:
        raise UserError(f"a budget of {budget:g} keeps no example of a pool of {n}; raise the budget")
    return k


def _check_pool(pool: CorruptedPool, budget: float) -> int:
    k = _budget_k(budget, len(pool.dataset.y_train))
    if len(np.unique(pool.dataset.y_train)) < 2:
        raise UserError("the pool needs examples of at least 2 classes")
    return k


#: Methods for a user's task (``--task``): the rest need the presets' ground truth, validation
#: split as arrays, or a linear head.
TASK_METHODS = ("full", "random", "small-loss", "margin", "el2n", "val-agreement", "tracin", "less", "mgd")


#: Methods that read class labels and logits.
CLASS_METHODS = ("margin", "el2n", "val-agreement")


def check_task_methods(runs: TaskRuns, methods: Sequence[str]) -> None:
    """Refuse, before any work, a method a user's task cannot run (one line, with the fix)."""
    outside = [m for m in methods if m not in TASK_METHODS]
    if outside:
        raise UserError(f"{', '.join(outside)}: not available for a user's task (it has no ground truth, "
                        f"validation arrays or linear head); choose from {', '.join(TASK_METHODS)}")
    if not runs.classification:
        need = [m for m in methods if m in CLASS_METHODS]
        if need:
            raise UserError(
                f"{', '.join(need)} need{'s' if len(need) == 1 else ''} class labels and logits, and the task's "
                "run does not classify (its batches carry no labels or its outputs are not (batch, classes) "
                "logits); drop them from --methods"
            )
    if "mgd" in methods:
        runs.require("data_weights", "MGD selection")


def resolve_methods(methods: Sequence[str]) -> list[str]:
    """Validate a method list (order kept)."""
    return check_choices(methods, METHODS, "--methods")


def candidate_names(method: str) -> list[str]:
    return ["mgd-selection", "mgd-reweighting"] if method == "mgd" else [method]


def run_selection(
    config: RunConfig | None,
    pool: CorruptedPool | None,
    *,
    runs: TaskRuns | None = None,
    budget: float = 0.5,
    methods: Sequence[str] = METHODS,
    mgd: MGDSettings = MGDSettings(),
    crafting_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    eval_seeds: Sequence[int] = tuple(range(100, 110)),
    finished: Mapping[str, Candidate] | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    store=None,
    progress: Callable[[str, int], None] | None = None,
    eval_workers: int = 1,
) -> dict:
    """Run every method, then evaluate all candidates with :func:`mgd.apps.protocol.evaluate`.

    ``eval_workers``: processes for the retraining runs of the evaluation (same results).

    Args:
        config: the frozen recipe (its ``label_noise`` must be 0: corrupt the pool instead).
        pool: from :func:`corrupt_pool` (rates 0 for a user's own pool).
        runs: instead of ``config`` and ``pool`` (both ``None``), a user's task
            (:class:`~mgd.apps.tasks.TaskRuns`): its training data is the pool, candidates are
            retrained by the task function and measured by its objective, metrics and test
            metrics (:func:`mgd.apps.protocol.evaluate_task`); methods from :data:`TASK_METHODS`.
        budget: ``k / N``, in ``(0, 1]``.
        methods: names from :data:`METHODS`.
        mgd: MGD's settings.
        crafting_seeds, eval_seeds: disjoint seed lists.
        finished: candidates already produced (resume); their methods are not rerun.
        on_candidate: called with each new candidate (e.g. to save it).
        store: a run directory where MGD saves its descent after every meta-step (resume).
        progress: ``(phase, n)`` callback.

    Returns:
        The protocol report plus a ``selection`` section (budget, ``k``, corruption, MGD
        history, per-method precision and composition, precision vs budget).
    """
    methods = resolve_methods(methods)
    crafting_seeds = list(crafting_seeds)
    if not crafting_seeds:
        raise UserError("need at least one crafting seed")
    check_seeds(crafting_seeds, list(eval_seeds))
    if runs is not None:
        check_task_methods(runs, methods)
        ctx = SelectionContext(None, None, _budget_k(budget, runs.size), crafting_seeds, runs=runs)
    else:
        if config.label_noise:
            raise UserError("corrupt the pool with corrupt_pool (--label-noise of mgd select), not RunConfig.label_noise")
        ctx = SelectionContext(config, pool, _check_pool(pool, budget), crafting_seeds)
    k = ctx.k
    started = time.perf_counter()
    ctx.run_seconds = training_run_seconds(ctx.make(crafting_seeds[0])[0])

    done = dict(finished or {})
    history: list[dict] = []

    def add(candidate: Candidate) -> None:
        done[candidate.name] = candidate
        if on_candidate is not None:
            on_candidate(candidate)
        if progress is not None:
            progress("methods", 1)

    simple = {"full": select_full, "random": select_random, "val-agreement": select_val_agreement,
              "tracin": select_tracin, "less": select_less, "influence": select_influence,
              "oracle": select_oracle, "val-only": train_val_only}
    early = [m for m in methods if m in _EARLY_SCORES and m not in done]
    if early:
        for candidate in select_by_early_training(ctx, early):
            add(candidate)
    for method in methods:
        if all(name in done for name in candidate_names(method)):
            continue
        if method == "mgd":
            selection, reweighting, history = mgd_select(ctx, mgd, store=store, progress=progress)
            selection.info["history"] = history
            add(selection)
            add(reweighting)
        else:
            add(simple[method](ctx))
    candidates = [done[name] for m in methods for name in candidate_names(m)]
    crafting_seconds = time.perf_counter() - started

    orders = {name: c.info.get("order") for name, c in done.items()}
    if "mgd-selection" in done:
        history = done["mgd-selection"].info.get("history", history)
    for candidate in candidates:  # rankings and histories are diagnostics, not table entries
        candidate.info = {key: v for key, v in candidate.info.items() if key not in ("order", "history")}
    if runs is not None:
        report = evaluate_task(runs, candidates, list(eval_seeds), progress=progress, workers=eval_workers)
    else:
        report = evaluate(config, pool.dataset, candidates, list(eval_seeds), progress=progress, workers=eval_workers)
    report["selection"] = {
        "budget": budget,
        "k": k,
        "pool_size": ctx.size,
        "corruption": pool.rates if pool is not None else None,
        "pool_composition": pool.composition(np.arange(len(pool.kind))) if pool is not None else None,
        "crafting_seeds": crafting_seeds,
        "crafting_seconds": crafting_seconds,
        "training_run_seconds": ctx.run_seconds,
        "mgd": mgd.to_dict() if "mgd" in methods else None,
        "mgd_history": history,
        "precision_vs_budget": (precision_vs_budget(pool, {n: o for n, o in orders.items() if o is not None})
                                if pool is not None else {}),
    }
    return report


def precision_vs_budget(pool: CorruptedPool, orders: Mapping[str, np.ndarray],
                        budgets: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> dict:
    """Fraction clean among each method's top ``b · N`` (diagnostic; from one ranking per
    method, whose hyperparameters were tuned at the run's budget only)."""
    n = len(pool.kind)
    return {
        name: {str(b): float(pool.clean[np.asarray(order)[: max(1, int(round(b * n)))]].mean()) for b in budgets}
        for name, order in orders.items()
    }


def selection_markdown(report: dict) -> str:
    """The diagnostics table: precision and composition of each kept set, chosen hyperparameters."""
    sel = report["selection"]
    rates = sel["corruption"]
    if rates is None:
        about = ("the task's own training data (no ground truth, so no precision); test numbers come "
                 "only from the task's test metrics after the retraining above.")
    else:
        about = (f"corruption: label noise {rates['label_noise']:g}, off-distribution {rates['off_distribution']:g}, "
                 f"duplicates {rates['duplicates']:g} (seed {rates['seed']}). Precision (fraction clean) is a "
                 "diagnostic from the ground truth, which no method reads; test numbers come only from the "
                 "retraining above.")
    lines = [
        "",
        f"Pool of {sel['pool_size']}, budget {sel['budget']:g} (k = {sel['k']}); {about}",
        "",
        "| method | what is trained | precision | clean / label-noise / off-dist / duplicate | tuned on val |",
        "|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        info = m["info"]
        counts = info.get("counts")
        comp = " / ".join(str(counts[k]) for k in KINDS) if counts else "-"
        prec = f"{100 * info['precision']:.1f}%" if "precision" in info else "-"
        if "mean_weight_by_kind" in info:
            comp = "mean weight " + " / ".join(f"{v:.2f}" for v in info["mean_weight_by_kind"].values())
        hyper = info.get("hyperparameters", {})
        hyper_text = ", ".join(f"{k}={v}" for k, v in hyper.items() if v is not None) or "-"
        if "chosen_iterate" in info:
            hyper_text += f"; iterate {info['chosen_iterate']}"
        lines.append(f"| {name} | {info.get('selection', '-')} | {prec} | {comp} | {hyper_text} |")
    lines.append("")
    lines.append(f"Crafting (all methods): {sel['crafting_seconds']:.1f} s; one training run of the recipe on "
                 f"the pool: {sel['training_run_seconds']:.2f} s (the unit of the cost column).")
    return "\n".join(lines) + "\n"
