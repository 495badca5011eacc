"""A user's training run as the applications see it (``mgd select|poison|schedule --task``).

The task function (:mod:`mgd.task`) builds one :class:`~mgd.task.Task` per seed: the run, its
validation objective ``φ``, validation ``metrics`` and held-out ``test`` metrics.
:class:`TaskRuns` is what the applications call instead of a built-in preset:

* :meth:`TaskRuns.make` — the run for a crafting seed, on all of its training data or on a
  subset (``indices``), optionally with a different number of steps, optimizer or learning
  rate, or trained on the objective's own data (the "train on validation only" reference);
* :meth:`TaskRuns.evaluate` — a candidate (a subset and/or metaparameter values) retrained
  with an evaluation seed and measured by the objective, the metrics and the test metrics;
  the only place the test metrics are read;
* the pool's size and, when the run classifies (its batches carry labels and its outputs are
  ``(B, C)`` logits), the pool's labels, for class-aware baselines.

Per-example quantities on a run's data, for the baselines (:func:`per_example_losses`,
:func:`per_example_grads`), use the run's own loss and call convention, in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mgd.batches import Field, TensorData, set_field, tree_map
from mgd.errors import UserError
from mgd.losses import LABEL_KEYS, Objective, labels_of, logits_of
from mgd.step import TrainingRun, TrainState
from mgd.task import Task, TaskFunction

__all__ = [
    "TaskRuns", "data_batches", "per_example_losses", "per_example_logits", "per_example_grads",
    "sum_of_losses_gradient", "losses_jvp", "objective_parts",
]

_CACHE: dict[tuple, "TaskRuns"] = {}


def _freeze(options: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in options.items()))


def data_batches(data, size: int | None = None):
    """``(indices, batch)`` over all of ``data`` (a run's or an objective's), in order: in-memory
    data in one batch of up to 4096 examples, a ``Dataset`` 256 at a time (``size``: else)."""
    n = len(data)
    if size is None:
        size = 4096 if isinstance(data, TensorData) else 256
    for start in range(0, n, size):
        index = torch.arange(start, min(start + size, n))
        yield index, data.batch(index)


class TaskRuns:
    """The runs of a task function (see the module docstring).

    Args:
        build: a :class:`~mgd.task.TaskFunction` (or any ``(**options, seed=) -> Task``).
        options: the other options the function is called with (``steps``, ``dtype``, ...).
        spec: ``FILE.py:FUNCTION`` with an absolute path, so that worker processes can import
            it (``None``: evaluation runs in this process only).
    """

    def __init__(self, build: Callable[..., Task], options: Mapping[str, Any] | None = None, *,
                 spec: str | None = None):
        self.build, self.options, self.spec = build, dict(options or {}), spec
        self._tasks: dict[int, Task] = {}
        first = self.task(int(self.options.get("seed", 0)))
        self.size = first.run.num_train
        self.metric_names = tuple(first.metrics)
        self.test_names = tuple(first.test)
        self.labels, self.num_classes = _pool_labels(first.run)

    @classmethod
    def cached(cls, spec: str, options: Mapping[str, Any]) -> "TaskRuns":
        """One :class:`TaskRuns` per (spec, options) in a process (worker processes reuse it)."""
        key = (spec, _freeze(options))
        if key not in _CACHE:
            _CACHE[key] = cls(TaskFunction(spec), options, spec=spec)
        return _CACHE[key]

    @property
    def classification(self) -> bool:
        return self.labels is not None

    def task(self, seed: int) -> Task:
        """The task built with ``seed`` (built once per seed; a run is never mutated)."""
        seed = int(seed)
        if seed not in self._tasks:
            if len(self._tasks) >= 8:  # keep memory bounded for long seed lists
                self._tasks.pop(next(iter(self._tasks)))
            self._tasks[seed] = self.build(**{k: v for k, v in self.options.items() if k != "seed"}, seed=seed)
        return self._tasks[seed]

    def require(self, kind: str, what: str) -> None:
        """Refuse an application the task's run cannot serve (one line, with the fix)."""
        task = self.task(int(self.options.get("seed", 0)))
        if kind not in task.run.metaparams:
            raise UserError(
                f"{what} needs the {kind} metaparameter, which the task's run does not have; add "
                f"{kind!r} to metaparams=[...] in the task function"
            )

    def make(self, seed: int, indices: np.ndarray | None = None, *, steps: int | None = None,
             optimizer=None, lr: float | None = None, on_objective_data: bool = False
             ) -> tuple[TrainingRun, Callable]:
        """``(run, objective)`` for ``seed``: on the ``indices`` subset (``None``: all), with
        ``steps``/``optimizer``/``lr`` replaced when given, or trained on the objective's data
        (``on_objective_data``: the validation-only reference and val-agreement)."""
        task = self.task(seed)
        run = task.run
        if on_objective_data:
            if not isinstance(task.objective, Objective):
                raise UserError("training on the validation data needs an mgd.Objective as the task's objective")
            data = task.objective.data
            run = run.replaced(data=data, batch_size=min(run.batch_size, len(data)))
        elif indices is not None:
            run = run.restricted(indices)
        changes = {k: v for k, v in (("steps", steps), ("optimizer", optimizer), ("lr", lr)) if v is not None}
        if changes:
            run = run.replaced(**changes)
        return run, task.objective

    def validation(self, run: TrainingRun, objective: Callable, state: TrainState) -> dict[str, float]:
        """``val_loss`` (the objective) and every validation metric at ``state``; no test data."""
        named = run.named_tensors(state.params.detach(), state.buffers.detach())
        task_metrics = self.task(run.seed).metrics
        with torch.no_grad():
            out = {"val_loss": float(objective(named))}
            for name, metric in task_metrics.items():
                out[name] = float(metric(named))
        return out

    def training_set(self, field: Field) -> tuple[np.ndarray, np.ndarray]:
        """The pool's inputs at ``field`` and its labels, as float64 / int64 arrays (poisoning)."""
        run = self.task(0).run
        if not isinstance(run.data, TensorData):
            raise UserError("poisoning a task needs its training data as in-memory tensors, not a Dataset")
        if not self.classification:
            raise UserError("accuracy-degrading poisoning needs a classifier: batches with labels and "
                            "(batch, classes) logits")
        x = run.data.field(field)
        if not x.is_floating_point():
            raise UserError(f"the training field {field!r} is not a float tensor; name the inputs with --poison-field")
        return x.detach().double().cpu().numpy(), self.labels.copy()

    def with_training_set(self, seed: int, x: np.ndarray, y: np.ndarray, field: Field, *,
                          metaparams: Sequence = ()) -> tuple[TrainingRun, Callable]:
        """``(run, objective)`` for ``seed`` with the inputs at ``field`` and the labels replaced
        (a poisoned training set of the same size), and further metaparameter kinds added."""
        task = self.task(seed)
        run = task.run
        tensors = run.data.tensors
        inputs = run.data.field(field)
        labels = labels_of(tensors)
        tensors = set_field(tensors, field, torch.as_tensor(x, dtype=inputs.dtype, device=inputs.device))
        tensors = set_field(tensors, label_field(tensors), torch.as_tensor(y, dtype=labels.dtype, device=labels.device))
        kinds = [*run.metaparams.values(), *metaparams]
        return run.replaced(data=TensorData(tensors), metaparams=kinds), task.objective

    def evaluate(self, candidate, seed: int) -> dict[str, float]:
        """Retrain ``candidate`` (its ``subset``, its training set ``x_train``/``y_train`` at
        ``info["input_field"]``, and ``meta``) with ``seed``; the objective, the metrics and the
        held-out test metrics. The one place ``Task.test`` is read."""
        task = self.task(seed)
        if candidate.x_train is not None:
            run, _ = self.with_training_set(seed, candidate.x_train, candidate.y_train, candidate.info["input_field"])
        else:
            run = task.run if candidate.subset is None else task.run.restricted(candidate.subset)
        meta = {name: torch.as_tensor(np.asarray(v), dtype=run.dtype, device=run.device)
                for name, v in candidate.meta.items()}
        if "data_weights" in meta and candidate.subset is not None:
            raise UserError(f"candidate {candidate.name!r} gives both a subset and data weights")
        final = run.run(meta)
        named = run.named_tensors(final.params, final.buffers)
        out: dict[str, float] = {"seed": seed}
        with torch.no_grad():
            out["val_objective"] = float(task.objective(named))
            for name, metric in (*task.metrics.items(), *task.test.items()):
                out[name] = float(metric(named))
        return out


def label_field(batch) -> Field:
    """Where :func:`mgd.losses.labels_of` finds a batch's labels: position 1, or the dict key."""
    if isinstance(batch, dict):
        return next(key for key in LABEL_KEYS if key in batch)
    return 1


def _pool_labels(run: TrainingRun) -> tuple[np.ndarray | None, int | None]:
    """The pool's class labels if the run classifies (labels in the batch, ``(B, C)`` logits)."""
    try:
        labels = torch.cat([labels_of(batch).reshape(-1) for _, batch in data_batches(run.data)])
    except UserError:
        return None, None
    if labels.dtype not in (torch.int64, torch.int32) or len(labels) != run.num_train:
        return None, None
    state = run.init_state()
    batch = run.data.batch(torch.arange(min(2, run.num_train)))
    args, kwargs = run.inputs_of(batch)
    with torch.no_grad():
        try:
            logits = logits_of(run.predict(state.params, state.buffers, *args, **kwargs))
        except UserError:
            return None, None
    if logits.dim() != 2:
        return None, None
    return labels.cpu().numpy().astype(np.int64), int(logits.shape[1])


def _outputs(run: TrainingRun, params: Tensor, buffers: Tensor, batch) -> Any:
    args, kwargs = run.inputs_of(batch)
    return run.predict(params, buffers, *args, **kwargs)


def per_example_losses(run: TrainingRun, state: TrainState, data=None, loss=None) -> np.ndarray:
    """The run's per-example loss (``loss``: another one) on every example of ``data`` (default:
    the run's training data), eval mode, float64."""
    data = run.data if data is None else data
    loss = run.loss if loss is None else loss
    parts = []
    with torch.no_grad():
        for _, batch in data_batches(data):
            parts.append(loss(_outputs(run, state.params, state.buffers, batch), batch).double().cpu())
    return torch.cat(parts).numpy()


def per_example_logits(run: TrainingRun, state: TrainState, data=None) -> np.ndarray:
    """Class logits ``(N, C)`` of every example of ``data`` (default: the run's), eval mode."""
    data = run.data if data is None else data
    with torch.no_grad():
        return torch.cat([logits_of(_outputs(run, state.params, state.buffers, batch)).double().cpu()
                          for _, batch in data_batches(data)]).numpy()


def per_example_grads(run: TrainingRun, params: Tensor, buffers: Tensor, data=None, loss=None,
                      chunk: int = 256, transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(N, P)`` gradients of each example's loss with respect to the flat trainable
    parameters, eval mode (``torch.func.vmap`` over examples; one example at a time where the
    model cannot be vmapped). ``transform`` maps each chunk's ``(n, P)`` gradients first (e.g.
    to a random projection), so that the ``(N, P)`` matrix is never held."""
    data = run.data if data is None else data
    loss = run.loss if loss is None else loss
    params = params.detach()

    def one(p: Tensor, example) -> Tensor:
        batch = tree_map(lambda t: t.unsqueeze(0), example)
        return loss(_outputs(run, p, buffers, batch), batch)[0]

    grad_one = torch.func.grad(one)
    rows, vmappable = [], True
    for start in range(0, len(data), chunk):
        index = torch.arange(start, min(start + chunk, len(data)))
        batch = data.batch(index)
        grads = None
        if vmappable:
            try:
                grads = torch.func.vmap(grad_one, in_dims=(None, 0))(params, batch)
            except Exception:  # a model vmap cannot trace (data-dependent control flow): loop,
                vmappable = False  # and do not try again on the next chunks
        if grads is None:
            grads = torch.stack([grad_one(params, tree_map(lambda t: t[i], batch)) for i in range(len(index))])
        rows.append(grads if transform is None else transform(grads))
    return torch.cat(rows)


def sum_of_losses_gradient(run: TrainingRun, params: Tensor, buffers: Tensor, data, loss) -> Tensor:
    """``∇_θ Σ_v ℓ_v(θ)`` over every example of ``data`` (e.g. the validation set), eval mode."""
    params = params.detach().requires_grad_(True)
    total = torch.zeros_like(params)
    with torch.enable_grad():
        for _, batch in data_batches(data):
            (grad,) = torch.autograd.grad(loss(_outputs(run, params, buffers, batch), batch).sum(), params)
            total += grad
    return total


def losses_jvp(run: TrainingRun, params: Tensor, buffers: Tensor, direction: Tensor, data=None) -> np.ndarray:
    """``∇ℓ_i(θ) · d`` for every training example ``i``: one forward-mode pass per batch."""
    data = run.data if data is None else data
    parts = []
    for _, batch in data_batches(data):
        _, dots = torch.func.jvp(lambda p: run.loss(_outputs(run, p, buffers, batch), batch),
                                 (params.detach(),), (direction,))
        parts.append(dots.double().cpu())
    return torch.cat(parts).numpy()


def objective_parts(objective: Callable, what: str) -> Objective:
    """The task's objective as an :class:`~mgd.losses.Objective` (data and per-example loss),
    which the gradient-similarity baselines need."""
    if not isinstance(objective, Objective):
        raise UserError(f"{what} needs the task's objective to be an mgd.Objective (its data and loss)")
    return objective
