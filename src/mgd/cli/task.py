"""``--task FILE.py:FUNCTION``: ``mgd train``, ``grad`` and ``optimize`` on a user's own run.

What a command trains is a :class:`Subject`: the run, its validation objective, the
metaparameter values read from the files given, how to report a final state, and what
identifies the run in ``result.json``. :func:`subject_from_args` builds one from the preset
flags (:class:`PresetSubject`) or from ``--task`` (:class:`TaskSubject`); the commands then do
the same for both.

With ``--task`` the function defines the run, so the preset flags (``--dataset``, ``--model``,
``--lr``, ...) are refused when given; ``--seed``, ``--steps``, ``--dtype`` and ``--device`` are
passed to it (only those given, and only if it takes them, see :mod:`mgd.task`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from mgd.cli.common import collective_from_args, config_from_args, given_flags, meta_files
from mgd.config import CLI_METAPARAMS, DTYPES, RunConfig, build_problem, load_meta_files, resolve_device
from mgd.distributed import launched_by_torchrun
from mgd.errors import UserError, check_choices
from mgd.evaluation import parallel_map, retrain_and_evaluate
from mgd.losses import objective_value as _objective_value
from mgd.step import TrainingRun, TrainState
from mgd.task import TASK_OPTIONS, Task, TaskFunction

__all__ = [
    "add_task_flag", "subject_from_args", "meta_names", "Subject", "PresetSubject", "TaskSubject",
    "evaluate_task", "describe_run", "task_builder", "task_runs_from_args", "task_identity",
]

#: What the preset path reports after retraining (``mgd optimize``).
PRESET_METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
#: result.json keys the commands write themselves: a task's metric may not take one.
RESERVED = frozenset({
    "val_objective", "task", "task_sha256", "task_options", "run", "threads", "train_seconds",
    "peak_memory_mb", "mgd_version", "metagrad_norms", "mode", "plan", "timing", "meta",
    "meta_files", "seed",
})


def add_task_flag(parser: argparse.ArgumentParser, *, reseeded: bool = False) -> None:
    """``--task FILE.py:FUNCTION`` (``reseeded``: the command calls it once per seed)."""
    text = (
        "train the run FUNCTION in FILE.py builds instead of a preset: it returns "
        "mgd.Task(run, objective, metrics) (see the mgd.task module). The preset flags (--dataset, "
        "--model, --lr, --batch-size, ...) then do not apply; --seed, --steps, --dtype and --device "
        "are passed to the function if it takes them (only when given). Metaparameter files "
        "(--data-weights, --lr-multipliers, --lr-knots) must match the run's kinds. Give --device "
        "cuda for a GPU run, so that deterministic kernels are switched on"
    )
    if reseeded:
        text += "; the function must take seed=: it is called once per crafting and evaluation seed"
    parser.add_argument_group("your own training run").add_argument(
        "--task", metavar="FILE.py:FUNCTION", help=text)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_task_flags(args: argparse.Namespace) -> None:
    """Refuse preset flags given together with ``--task``."""
    preset = [name for name in RunConfig.field_names() if name not in TASK_OPTIONS]
    given = given_flags(args)
    conflicts = [_flag(name) for name in preset if name in given]
    if len(conflicts) == 1:
        raise UserError(f"{conflicts[0]} does not apply with --task: set it in the task function")
    if conflicts:
        raise UserError(f"{', '.join(conflicts)} do not apply with --task: set them in the task function")


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :data:`mgd.task.TASK_OPTIONS` given as flags, as the function gets them."""
    given = given_flags(args)
    convert = {"seed": int, "steps": int, "dtype": DTYPES.__getitem__, "device": resolve_device}
    return {name: convert[name](getattr(args, name)) for name in TASK_OPTIONS if name in given}


def meta_names(args: argparse.Namespace, run: TrainingRun) -> list[str]:
    """The metaparameters ``--meta`` names: preset kinds, or kinds of the task's run (default all)."""
    if not getattr(args, "task", None):
        return check_choices(args.meta.split(","), CLI_METAPARAMS, "--meta")
    kinds = list(run.metaparams)
    fix = "add kinds with metaparams=[...] in the task function"
    if not kinds:
        raise UserError(f"the task's run has no metaparameters to differentiate; {fix}, e.g. ['data_weights']")
    if "meta" not in given_flags(args):
        return kinds
    unknown = [n.strip() for n in args.meta.split(",") if n.strip() and n.strip() not in kinds]
    if unknown:
        raise UserError(
            f"--meta: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a metaparameter "
            f"of the task's run; it has {', '.join(kinds)} ({fix})"
        )
    return check_choices(args.meta.split(","), kinds, "--meta")


def describe_run(run: TrainingRun) -> dict:
    """What a run is, for result.json: its size, schedule and metaparameter kinds."""
    return {
        "steps": run.steps,
        "batch_size": run.batch_size,
        "lr": run.lr,
        "weight_decay": run.weight_decay,
        "seed": run.seed,
        "optimizer": type(run.optimizer).__name__,
        "num_params": run.num_params,
        "num_train": run.num_train,
        "metaparams": list(run.metaparams),
        "dtype": str(run.dtype).removeprefix("torch."),
        "device": str(run.device),
    }


def _number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(
            f"{what} returned {type(value).__name__}; return a number (a float or a one-element tensor)"
        ) from None


def objective_value(run: TrainingRun, objective: Callable, final: TrainState) -> float:
    """``φ(θ_T)`` computed exactly as :func:`mgd.replay.metagradient` computes it (same bits)."""
    return _number(_objective_value(run, objective, final), "the task's objective")


def evaluate_task(task: Task, final: TrainState, value: float | None = None) -> dict[str, float]:
    """``val_objective`` (``value`` if known) and every metric of ``task`` at ``final``."""
    out = {"val_objective": objective_value(task.run, task.objective, final) if value is None else value}
    named = task.run.named_tensors(final.params, final.buffers)
    with torch.no_grad():
        for name, metric in task.metrics.items():
            out[name] = _number(metric(named), f"Task.metrics[{name!r}]")
    return out


def _retrain_task(spec: str, options: Mapping[str, Any], meta: Mapping[str, Tensor], seed: int) -> dict:
    """Build the task with ``seed`` (in a worker process: importing it anew), train, evaluate."""
    return _retrain_with(TaskFunction(spec), options, meta, seed)


def _retrain_with(builder: TaskFunction, options: Mapping[str, Any], meta: Mapping[str, Tensor], seed: int) -> dict:
    task = builder(**{**options, "seed": seed})
    return {"seed": seed, **evaluate_task(task, task.run.run(dict(meta)))}


class Subject:
    """What a command trains (see the module docstring); built by :func:`subject_from_args`.

    Attributes:
        run, objective: the training run and its validation objective ``φ``.
        meta: a value for every metaparameter kind of the run (files given, else neutral).
        collective: the data-parallel group (one process for a task).
        label: how the summary line names the run.
        record: the result.json keys that say which run this was.
        headline: ``(label, key)`` pairs of the numbers the summary line prints.
        objective_key: the result.json key of ``φ(θ_T)``.
        metrics: the keys :meth:`retrain` reports per seed.
    """

    run: TrainingRun
    objective: Callable
    meta: dict[str, Tensor]
    collective: Any
    label: str
    record: dict
    headline: tuple[tuple[str, str], ...]
    objective_key: str
    metrics: tuple[str, ...]
    evaluation_note: str | None = None

    def evaluate(self, final: TrainState, value: float | None = None) -> dict[str, float]:
        """The numbers reported at a final state (``value``: ``φ(θ_T)`` when already known)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What defines the run for ``mgd optimize --resume`` (must match to continue)."""
        raise NotImplementedError

    def reseeded(self, seed: int) -> tuple[TrainingRun, Callable]:
        """``(run, objective)`` of the same run with another seed (MGD's crafting seeds)."""
        raise NotImplementedError

    def retrain(self, meta: Mapping[str, Tensor], seeds: Sequence[int], *, workers: int) -> list[dict]:
        """Train anew with each seed and ``meta``: ``{"seed", *metrics}`` per seed."""
        raise NotImplementedError

    def diagnostics(self, z: Mapping[str, Tensor]) -> dict:
        """Extra numbers recorded at each meta-step (never from a test split)."""
        return {}

    def headline_text(self, numbers: Mapping[str, float]) -> str:
        return ", ".join(f"{label} {numbers[key]:.4f}" for label, key in self.headline)


class PresetSubject(Subject):
    """A built-in dataset and model preset (:func:`mgd.config.build_problem`)."""

    headline = (("val loss", "val_loss"), ("val acc", "val_accuracy"), ("test acc", "test_accuracy"))
    objective_key = "val_loss"
    metrics = PRESET_METRICS

    def __init__(self, args: argparse.Namespace):
        self.config = config_from_args(args)
        self.collective = collective_from_args(args)
        self.problem = build_problem(self.config, collective=self.collective)
        self.run = self.problem.trainer
        self.objective = self.problem.val_objective()
        self.meta = self.problem.load_meta_files(meta_files(args))
        self.label = f"{self.config.model} on {self.problem.dataset.name}"
        self.record = {
            "config": self.config.to_dict(),
            "distributed": self.collective.describe(),
            "dataset": self.problem.dataset.summary(),
            "num_params": self.run.num_params,
        }

    def evaluate(self, final: TrainState, value: float | None = None) -> dict[str, float]:
        metrics = self.problem.evaluate(final)
        if value is None:
            return metrics
        return {"val_loss": value, "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"]}

    def identity(self) -> dict:
        return {"run": self.config.to_dict(), "distributed": self.collective.describe()}

    def reseeded(self, seed: int) -> tuple[TrainingRun, Callable]:
        config = RunConfig(**{**self.config.to_dict(), "seed": seed})
        problem = build_problem(config, dataset=self.problem.dataset, collective=self.collective)
        return problem.trainer, problem.val_objective()

    def retrain(self, meta: Mapping[str, Tensor], seeds: Sequence[int], *, workers: int) -> list[dict]:
        return retrain_and_evaluate(
            self.config, self.problem.dataset, meta, seeds, workers=workers, collective=self.collective
        )

    def diagnostics(self, z: Mapping[str, Tensor]) -> dict:
        corrupted = self.problem.corrupted
        if corrupted is None or "data_weights" not in z:
            return {}
        w = z["data_weights"].detach().cpu().numpy()
        return {  # ground truth read for reporting only; nothing else uses it
            "mean_weight_corrupted": float(w[corrupted].mean()),
            "mean_weight_clean": float(w[~corrupted].mean()),
        }


class TaskSubject(Subject):
    """The run a user's task function builds (``--task FILE.py:FUNCTION``)."""

    objective_key = "val_objective"
    evaluation_note = (
        "no test split: the start and the chosen iterate were retrained with the task function "
        "on the evaluation seeds and measured with the task's objective and metrics, on the data "
        "the task defines (the validation objective is the one MGD optimised; a held-out "
        "metric in Task.metrics is the honest number)"
    )

    def __init__(self, args: argparse.Namespace, *, reseeded: bool = False, command: str = "mgd"):
        self.builder, self.options = task_builder(args, reseeded=reseeded, command=command)
        name = self.builder.name
        self.task = self.builder(**self.options)
        bad = sorted(RESERVED.intersection(self.task.metrics))
        if bad:
            raise UserError(f"Task.metrics name {bad[0]!r} is a key mgd writes itself; rename the metric")
        self.run, self.objective = self.task.run, self.task.objective
        self.collective = self.run.collective
        self.meta = load_task_meta(self.run, meta_files(args))
        self.label = args.task
        self.headline = (("val objective", "val_objective"), *((n, n) for n in self.task.metrics))
        self.metrics = ("val_objective", *self.task.metrics)
        given = given_flags(args)
        with open(self.builder.path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        self.record = {
            "task": args.task,
            "task_sha256": digest,
            "task_options": {k: getattr(args, k) for k in TASK_OPTIONS if k in given and k in self.options},
            "run": describe_run(self.run),
        }

    def evaluate(self, final: TrainState, value: float | None = None) -> dict[str, float]:
        return evaluate_task(self.task, final, value)

    def identity(self) -> dict:
        # the file by absolute path (a resume may start elsewhere) and by content
        return {**self.record, "task": f"{os.path.abspath(self.builder.path)}:{self.builder.name}"}

    def reseeded(self, seed: int) -> tuple[TrainingRun, Callable]:
        task = self.builder(**{**self.options, "seed": seed})
        return task.run, task.objective

    def retrain(self, meta: Mapping[str, Tensor], seeds: Sequence[int], *, workers: int) -> list[dict]:
        if workers <= 1 or len(seeds) <= 1:
            return [_retrain_with(self.builder, self.options, meta, seed) for seed in seeds]
        spec = f"{os.path.abspath(self.builder.path)}:{self.builder.name}"  # workers may start elsewhere
        return parallel_map(_retrain_task, [(spec, self.options, dict(meta), seed) for seed in seeds],
                            workers=workers)


def task_builder(args: argparse.Namespace, *, reseeded: bool, command: str) -> tuple[TaskFunction, dict]:
    """The task function of ``--task`` and the options it is called with (the flags it takes).

    Refuses preset flags, ``torchrun``, and (``reseeded``: the command calls it once per seed)
    a function without a ``seed`` argument; notes on stderr the flags the function ignores.
    """
    check_task_flags(args)
    if launched_by_torchrun():
        raise UserError("--task runs in one process; launch mgd without torchrun")
    builder = TaskFunction(args.task)
    name = builder.name
    if reseeded and not builder.accepts("seed"):
        raise UserError(
            f"--task {args.task}: {command} calls {name}() once per crafting and evaluation seed, "
            f"but it takes no seed argument; add one (def {name}(seed=0, ...)) and seed the model "
            "and the run with it"
        )
    options = task_options(args)
    for option in options:
        if not builder.accepts(option):
            print(f"{command}: note: {name}() takes no {option} argument; {_flag(option)} is ignored",
                  file=sys.stderr)
    return builder, {k: v for k, v in options.items() if builder.accepts(k)}


def task_runs_from_args(args: argparse.Namespace, *, command: str):
    """``--task`` as an application uses it (:class:`mgd.apps.tasks.TaskRuns`), with the file's
    absolute path so that evaluation workers can import it."""
    from mgd.apps.tasks import TaskRuns

    builder, options = task_builder(args, reseeded=True, command=command)
    spec = f"{os.path.abspath(builder.path)}:{builder.name}"
    return TaskRuns(builder, {k: v for k, v in options.items() if k != "seed"}, spec=spec)


def task_identity(args: argparse.Namespace, runs) -> dict:
    """What identifies a task for a run directory's ``--resume`` check: the file by absolute
    path and content, and the options given."""
    path, _, name = runs.spec.rpartition(":")
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"task": runs.spec, "task_sha256": digest,
            "task_options": {k: str(v) for k, v in runs.options.items()}}


def load_task_meta(run: TrainingRun, files: Mapping[str, str | None]) -> dict[str, Tensor]:
    """Metaparameter values from the ``.npy`` files given, for a task's run (else neutral)."""
    for name, path in files.items():
        if path is not None and name not in run.metaparams:
            flag = {"lr": "--lr-multipliers"}.get(name, _flag(name))
            raise UserError(
                f"{flag}: the task's run has no {name} metaparameter (it has "
                f"{', '.join(run.metaparams) or 'none'}); add {name!r} to metaparams= in the task "
                f"function or drop {flag}"
            )
    return load_meta_files(run, files)


def subject_from_args(args: argparse.Namespace, *, reseeded: bool = False, command: str = "mgd") -> Subject:
    """The preset run the flags describe, or the user's run with ``--task``.

    ``reseeded``: the command rebuilds the run with other seeds, so a task must take ``seed``.
    """
    if getattr(args, "task", None):
        return TaskSubject(args, reseeded=reseeded, command=command)
    return PresetSubject(args)
