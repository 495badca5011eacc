"""A user's training run for the command line: ``--task FILE.py:FUNCTION``.

The function builds the run (model, loss, data, optimizer) and its validation objective, and
returns a :class:`Task`. The command line calls it with the keyword arguments it accepts
among ``seed`` (an int), ``steps`` (an int), ``dtype`` (a ``torch.dtype``) and ``device`` (a
``torch.device``), only those the user gave as flags, so the same flags give the same run in
every process, which is what finite-difference checks of ``mgd grad`` with ``mgd train`` rely
on. ``mgd optimize`` calls it once per crafting and evaluation seed, so there it must take
``seed``.

Example ``task.py``::

    import torch, mgd

    def build(seed=0, steps=100):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        x, y = torch.randn(200, 8), torch.randint(0, 3, (200,))
        run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=(x[:160], y[:160]),
                           steps=steps, batch_size=32, lr=0.1, seed=seed,
                           metaparams=["lr", "data_weights"])
        val = mgd.Objective(run.stateless, (x[160:], y[160:]))
        return mgd.Task(run, val, metrics={"val_accuracy": mgd.Metric(run.stateless, (x[160:], y[160:]))})

and ``mgd grad --task task.py:build --meta data_weights``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mgd.errors import UserError
from mgd.step import TrainingRun

__all__ = ["Task", "TaskFunction", "load_task", "TASK_OPTIONS"]

#: The keyword arguments the command line may pass to a task function.
TASK_OPTIONS = ("seed", "steps", "dtype", "device")


@dataclass
class Task:
    """A user's run and what to measure at its end.

    Attributes:
        run: the :class:`~mgd.step.TrainingRun`.
        objective: the validation objective ``φ`` (e.g. :class:`mgd.losses.Objective`).
        metrics: further name → function of the final tensors (name → tensor dict) reported
            after training, e.g. ``{"val_accuracy": mgd.Metric(...)}``; not differentiated.
        test: held-out metrics, e.g. ``{"test_loss": mgd.Objective(run.stateless, test_data)}``:
            read only by the final evaluation of ``mgd select``, ``poison`` and ``schedule``
            (after every choice was made on the objective and ``metrics``), never during
            crafting, tuning or iterate choice.
    """

    run: TrainingRun
    objective: Callable[[Mapping[str, Any]], Any]
    metrics: Mapping[str, Callable[[Mapping[str, Any]], Any]] = field(default_factory=dict)
    test: Mapping[str, Callable[[Mapping[str, Any]], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.run, TrainingRun):
            raise UserError(f"Task.run must be an mgd.TrainingRun (mgd.make_run(...)), got {type(self.run).__name__}")
        if not callable(self.objective):
            raise UserError("Task.objective must be a function of the final tensors (e.g. mgd.Objective)")
        if not isinstance(self.metrics, Mapping) or not all(isinstance(n, str) for n in self.metrics):
            raise UserError("Task.metrics must be a dict of name -> function of the final tensors (e.g. mgd.Metric)")
        bad = [name for name, metric in self.metrics.items() if not callable(metric)]
        if bad:
            raise UserError(f"Task.metrics[{bad[0]!r}] is not callable")
        if not isinstance(self.test, Mapping) or not all(isinstance(n, str) for n in self.test):
            raise UserError("Task.test must be a dict of name -> function of the final tensors (e.g. mgd.Objective)")
        bad = [name for name, metric in self.test.items() if not callable(metric)]
        if bad:
            raise UserError(f"Task.test[{bad[0]!r}] is not callable")
        both = sorted(set(self.metrics) & set(self.test))
        if both:
            raise UserError(f"{both[0]!r} is both in Task.metrics and Task.test; give them distinct names")


def as_dtype(dtype: Any) -> "torch.dtype":
    """``torch.float32``/``torch.float64`` from a dtype or its name (``"float64"``,
    ``"torch.float64"``): task functions get a ``torch.dtype`` from the command line and often
    a name from Python."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}
    name = str(dtype).removeprefix("torch.")
    if name not in table:
        raise UserError(f"dtype must be float32 or float64, got {dtype!r}")
    return table[name]


def _split_spec(spec: str) -> tuple[str, str]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UserError(f"--task {spec!r}: write FILE.py:FUNCTION, e.g. --task my_task.py:build")
    return path, name


class TaskFunction:
    """A user's task function, imported once from ``FILE.py:FUNCTION``; call it to build a task.

    The file is imported like ``python FILE.py`` would run it: its folder comes first on
    ``sys.path``, so it may import modules next to it.

    Raises:
        UserError: a malformed spec, a missing file or function, or an error while importing.
    """

    def __init__(self, spec: str):
        path, name = _split_spec(spec)
        if not os.path.isfile(path):
            raise UserError(f"--task: no such file {path!r}; give the path of a Python file, e.g. --task my_task.py:build")
        self.spec, self.path, self.name = spec, path, name
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = f"mgd_task_{abs(hash(os.path.abspath(path)))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UserError(f"--task: cannot import {path!r} as Python source (does it end in .py?)")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as error:  # the user's file: report it in one line
            raise UserError(
                f"--task: importing {path} failed: {type(error).__name__}: {_first(error)}; fix the file"
            ) from None
        function = getattr(module, name, None)
        if function is None or not callable(function):
            functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
            raise UserError(
                f"--task: {path} has no function {name!r}"
                + (f"; it defines {', '.join(functions)}" if functions else "; define it, e.g. def build(seed=0): ...")
            )
        self.function = function
        try:
            self._parameters = dict(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            self._parameters = {}

    def accepts(self, option: str) -> bool:
        """Whether the function takes the keyword argument ``option`` (or ``**kwargs``)."""
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self._parameters.values()):
            return True
        parameter = self._parameters.get(option)
        return parameter is not None and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY,
        )

    def __call__(self, **options: Any) -> Task:
        """Call the function with the ``options`` it accepts (``None`` values are not passed)."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(TASK_OPTIONS))
        if unknown:
            raise UserError(f"unknown task option(s) {', '.join(unknown)}; tasks take {', '.join(TASK_OPTIONS)}")
        passed = {k: v for k, v in given.items() if self.accepts(k)}
        where = f"{self.path}:{self.name}"
        try:
            result = self.function(**passed)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"--task: {where} raised {type(error).__name__}: {_first(error)}") from None
        return _as_task(result, where)


def load_task(spec: str, **options: Any) -> Task:
    """Import ``FILE.py``, call ``FUNCTION`` with the options it accepts, check the result.

    ``options`` with value ``None`` are not passed. The function may return a :class:`Task`,
    a ``(run, objective)`` or ``(run, objective, metrics)`` tuple, or a dict with keys
    ``run``, ``objective`` (and ``metrics``).

    Raises:
        UserError: a missing file or function, an error while importing or calling it, or a
            return value that is not a task (one line naming the file and the fix).
    """
    return TaskFunction(spec)(**options)


def _as_task(result: Any, where: str) -> Task:
    if isinstance(result, Task):
        return result
    if isinstance(result, Mapping) and "run" in result and "objective" in result:
        return Task(result["run"], result["objective"], result.get("metrics", {}), result.get("test", {}))
    if isinstance(result, tuple) and len(result) in (2, 3, 4):
        return Task(*result)
    raise UserError(
        f"--task: {where} returned {type(result).__name__}; return mgd.Task(run, objective, metrics) "
        "(or a (run, objective) pair)"
    )


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
