"""Run configurations: one frozen dataclass that fully determines a training run.

The CLI resolves its flags into a :class:`RunConfig`, writes it into every ``result.json``,
and builds the run with :func:`build_problem`. The same config (and the same metaparameter
files) gives the same training run in any process, which is what lets ``mgd train`` at
``z ± h·d`` check ``mgd grad`` at ``z`` by finite differences.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.corruption import label_noise
from mgd.data import DATASETS, Dataset, load_dataset
from mgd.errors import UserError
from mgd.io import load_npy
from mgd.metaparams import LRKnots, resolve_metaparams
from mgd.models import build_model
from mgd.optim import make_optimizer
from mgd.training import Trainer, TrainState, accuracy, cross_entropy_objective

__all__ = ["RunConfig", "Problem", "build_problem", "DTYPES", "DEFAULT_LR"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
# Every CLI run has all four kinds, at neutral values unless a file is given, so that the
# training trajectory depends only on the config and the files, never on ``--meta``.
CLI_METAPARAMS = ("lr", "lr_knots", "data_weights", "weight_decay")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (see ``mgd train --help`` for each field)."""

    dataset: str = "digits"
    model: str = "mlp"
    width: int | None = None
    depth: int = 2
    activation: str | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    eps_root: float = 1e-16
    steps: int = 300
    batch_size: int = 100
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    num_knots: int = 10
    norm: str = "none"
    logit_scale: float = 1.0
    pooling: str = "avg"
    warmup_steps: int = 0
    label_noise: float = 0.0
    noise_seed: int = 0

    def resolved(self) -> "RunConfig":
        """Fill in the defaults that depend on other fields (model width, LR per optimizer)."""
        changes = {}
        if self.width is None:
            changes["width"] = 128 if self.model == "mlp" else 32
        if self.activation is None:
            changes["activation"] = "tanh" if self.model == "mlp" else "relu"
        if self.lr is None:
            changes["lr"] = DEFAULT_LR.get(self.optimizer, 0.05)
        if self.dataset not in DATASETS:  # a file: record where it was
            changes["dataset"] = os.path.abspath(self.dataset)
        return RunConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class Problem:
    """A built run: the dataset, the model, the :class:`~mgd.training.Trainer` and the splits."""

    config: RunConfig
    dataset: Dataset
    model: torch.nn.Module
    trainer: Trainer
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    corrupted: np.ndarray | None = None  # ground truth of the pool corruption: diagnostics only

    def val_objective(self):
        """``φ``: mean validation cross-entropy of the final parameters."""
        return cross_entropy_objective(self.model, self.x_val, self.y_val)

    @torch.no_grad()
    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Losses and accuracies of a training state on every split (eval mode)."""
        tr = self.trainer
        out = {}
        for split, x, y in (
            ("train", tr.x_train, tr.y_train),
            ("val", self.x_val, self.y_val),
            ("test", self.x_test, self.y_test),
        ):
            logits = tr.predict(state.params, state.buffers, x)
            out[f"{split}_loss"] = float(torch.nn.functional.cross_entropy(logits.double(), y))
            out[f"{split}_accuracy"] = accuracy(tr, state, x, y)
        return out

    def load_meta_files(self, files: Mapping[str, str | None]) -> dict[str, Tensor]:
        """Read metaparameter values from ``.npy`` files (``None`` = neutral default)."""
        return load_meta_files(self.trainer, files)


def load_meta_files(run, files: Mapping[str, str | None]) -> dict[str, Tensor]:
    """Metaparameter values of ``run`` from ``.npy`` files (``None``: the neutral default),
    checked by the run (shapes, NaN) and completed with defaults."""
    values = {}
    for name, path in files.items():
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        array = load_npy(path, what=flag)
        if not np.all(np.isfinite(array)):
            raise UserError(f"{flag}: {path} contains NaN or infinite values")
        values[name] = torch.as_tensor(np.asarray(array, dtype=np.float64))
    return run.check_meta(values)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` → a device (a clear error when unavailable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def build_problem(
    config: RunConfig, *, dataset: Dataset | None = None, collective: Collective = SINGLE_PROCESS
) -> Problem:
    """Build the dataset, model and trainer a config describes.

    ``collective``: train data-parallel over the ranks of :mod:`mgd.distributed`.
    """
    config = config.resolved()
    if config.dtype not in DTYPES:
        raise UserError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    for label, value in (("learning rate", config.lr), ("weight decay", config.weight_decay)):
        if not math.isfinite(value):
            raise UserError(f"{label} must be a finite number, got {value}")
    dtype = DTYPES[config.dtype]
    device = resolve_device(config.device)
    dataset = load_dataset(config.dataset) if dataset is None else dataset
    y_train, corrupted = dataset.y_train, None
    if config.label_noise:
        y_train, corrupted = label_noise(
            dataset.y_train, config.label_noise, dataset.num_classes, seed=config.noise_seed
        )
    options = {
        "width": config.width,
        "activation": config.activation,
        "norm": config.norm,
        "logit_scale": config.logit_scale,
    }
    if config.model == "mlp":
        options["depth"] = config.depth
    else:
        options["pooling"] = config.pooling
    model = build_model(
        config.model, dataset.input_shape, dataset.num_classes, seed=config.seed, dtype=dtype, **options
    ).to(device)
    optimizer = make_optimizer(
        config.optimizer, momentum=config.momentum, nesterov=config.nesterov, eps_root=config.eps_root
    )

    def tensor(a: np.ndarray, labels: bool = False) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long if labels else dtype, device=device)

    metaparams = resolve_metaparams(
        [name if name != "lr_knots" else LRKnots(config.num_knots) for name in CLI_METAPARAMS]
    )
    trainer = Trainer(
        model,
        optimizer,
        tensor(dataset.x_train),
        tensor(y_train, labels=True),
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        metaparams=metaparams,
        warmup_steps=config.warmup_steps,
        collective=collective,
    )
    return Problem(
        config,
        dataset,
        model,
        trainer,
        tensor(dataset.x_val),
        tensor(dataset.y_val, labels=True),
        tensor(dataset.x_test),
        tensor(dataset.y_test, labels=True),
        corrupted,
    )
