"""Metaparameters: named tensors ``z`` that shape training and whose metagradient we return.

A metaparameter kind is a small object with four methods (``method.md`` §3.3):

* ``default(trainer)``: its neutral value (training is unchanged at it);
* ``check(value, trainer)``: raise :class:`~mgd.errors.UserError` for a bad value;
* ``local(value, step, index)``: the slice step ``step`` reads (differentiable in ``value``),
  e.g. ``value[step]`` for per-step LR multipliers or ``value[index]`` for per-example weights;
* ``apply(local, inputs, step, trainer)``: return the :class:`StepInputs` changed by it;
* ``accumulate(total, local_grad, step, index)``: add the slice's gradient into the full
  gradient (the adjoint of ``local``).

The reverse pass only ever calls these methods, so a new kind (say, additive perturbations of
the training inputs) is one subclass plus :func:`register_metaparam`; nothing in
:mod:`mgd.replay` changes. The per-step cost stays proportional to the slice, not to ``z``.

Built-in kinds, with :math:`\\eta_\\text{base}` the base learning rate:

* ``lr``: per-step multipliers ``z ∈ R^T``, :math:`\\eta_t = \\eta_\\text{base}\\, z_t`;
* ``lr_knots``: ``K`` piecewise-linear knots of the log-LR multiplier, evenly spaced over the
  run, :math:`\\eta_t = \\eta_\\text{base} \\exp(\\sum_j w_j(t)\\,\\ell_j)` with hat weights ``w_j``
  (log space keeps ``η > 0`` without projection; all-zero knots leave the run unchanged);
* ``data_weights``: one weight per training example, loss :math:`\\frac1B\\sum_{i\\in B_t} w_i\\,\\ell_i`;
* ``weight_decay``: the scalar weight decay :math:`\\lambda` (default: the run's value).

All kinds that a run declares act at once; ``lr`` and ``lr_knots`` multiply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Iterable, Mapping, Union

import torch
from torch import Tensor

from mgd.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from mgd.training import Trainer

__all__ = [
    "StepInputs",
    "MetaParam",
    "PerStep",
    "PerExample",
    "Global",
    "LRMultipliers",
    "LRKnots",
    "DataWeights",
    "WeightDecay",
    "METAPARAMS",
    "register_metaparam",
    "resolve_metaparams",
]


@dataclass(frozen=True)
class StepInputs:
    """What one training step consumes.

    Attributes:
        index: indices of the minibatch's examples in the training set.
        x, y: the minibatch's inputs and labels.
        example_weights: per-example loss weights, or ``None`` for all ones.
        lr: the learning rate of this step (0-dim tensor).
        weight_decay: the weight decay of this step (float or 0-dim tensor).
        batch_size: the full minibatch size ``B`` the loss is averaged over; with data
            parallelism (:mod:`mgd.distributed`) ``index`` is this rank's shard of it.
            ``None``: ``len(index)``.
    """

    index: Tensor
    x: Tensor
    y: Tensor
    example_weights: Tensor | None
    lr: Tensor
    weight_decay: Union[float, Tensor]
    batch_size: int | None = None


class MetaParam(ABC):
    """Protocol for one kind of metaparameter (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def shape(self, trainer: "Trainer") -> tuple[int, ...]:
        """The full value's shape."""

    @abstractmethod
    def default(self, trainer: "Trainer") -> Tensor:
        """The neutral value, on the trainer's device and dtype."""

    @abstractmethod
    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        """The part of ``value`` that step ``step`` (minibatch ``index``) reads."""

    @abstractmethod
    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        """``total += (∂ local / ∂ value)ᵀ local_grad``, in place."""

    @abstractmethod
    def apply(self, local: Tensor, inputs: StepInputs, step: int, trainer: "Trainer") -> StepInputs:
        """How the slice changes what the step consumes."""

    def check(self, value: Tensor, trainer: "Trainer") -> None:
        """Reject values of the wrong shape or with NaN/inf (subclasses may add more)."""
        expected = tuple(self.shape(trainer))
        if tuple(value.shape) != expected:
            raise UserError(
                f"metaparameter {self.name!r} must have shape {expected}, got {tuple(value.shape)}"
                + _shape_hint(self.name, expected)
            )
        if not torch.isfinite(value).all():
            raise UserError(f"metaparameter {self.name!r} contains NaN or infinite values")

    def _full(self, trainer: "Trainer", fill: float) -> Tensor:
        return torch.full(self.shape(trainer), fill, dtype=trainer.dtype, device=trainer.device)


def _shape_hint(name: str, expected: tuple[int, ...]) -> str:
    if name == "lr":
        return f" (one multiplier per training step: --steps is {expected[0]})"
    if name == "data_weights":
        return f" (one weight per training example: the training set has {expected[0]})"
    return ""


class PerStep(MetaParam):
    """A value per training step; step ``t`` reads entry ``t``."""

    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        return value[step]

    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        total[step] += local_grad


class PerExample(MetaParam):
    """A value per training example; step ``t`` reads the rows of its minibatch."""

    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        return value[index]

    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        total.index_add_(0, index, local_grad)


class Global(MetaParam):
    """A value that every step reads whole."""

    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        return value

    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        total += local_grad


class LRMultipliers(PerStep):
    """``lr``: per-step learning-rate multipliers, ``η_t = η_base · z_t`` (default all ones)."""

    name = "lr"

    def shape(self, trainer: "Trainer") -> tuple[int, ...]:
        return (trainer.steps,)

    def default(self, trainer: "Trainer") -> Tensor:
        return self._full(trainer, 1.0)

    def apply(self, local: Tensor, inputs: StepInputs, step: int, trainer: "Trainer") -> StepInputs:
        return replace(inputs, lr=inputs.lr * local)


@dataclass(frozen=True)
class LRKnots(Global):
    """``lr_knots``: ``K`` knots of the log-LR multiplier, linearly interpolated over the run.

    Knot ``j`` sits at step ``j (T-1)/(K-1)``; ``K = 1`` is a constant multiplier ``exp(ℓ_0)``.
    The metagradient is ``ℓ̄_j = Σ_t η̄_t η_t w_j(t)`` (autograd computes it).
    """

    num_knots: int = 10
    name: ClassVar[str] = "lr_knots"

    def __post_init__(self) -> None:
        if self.num_knots < 1:
            raise UserError(f"lr_knots needs at least one knot, got {self.num_knots}")

    def shape(self, trainer: "Trainer") -> tuple[int, ...]:
        return (self.num_knots,)

    def default(self, trainer: "Trainer") -> Tensor:
        return self._full(trainer, 0.0)

    @staticmethod
    def hat_weights(step: int, steps: int, num_knots: int) -> tuple[int, float]:
        """``(j, α)`` such that the log multiplier at ``step`` is ``(1-α) ℓ_j + α ℓ_{j+1}``."""
        if num_knots == 1 or steps == 1:
            return 0, 0.0
        position = step * (num_knots - 1) / (steps - 1)
        j = min(int(position), num_knots - 2)
        return j, position - j

    def apply(self, local: Tensor, inputs: StepInputs, step: int, trainer: "Trainer") -> StepInputs:
        j, alpha = self.hat_weights(step, trainer.steps, self.num_knots)
        log_multiplier = local[j] if alpha == 0.0 else (1.0 - alpha) * local[j] + alpha * local[j + 1]
        return replace(inputs, lr=inputs.lr * torch.exp(log_multiplier))


class DataWeights(PerExample):
    """``data_weights``: per-example loss weights (default all ones)."""

    name = "data_weights"

    def shape(self, trainer: "Trainer") -> tuple[int, ...]:
        return (trainer.num_train,)

    def default(self, trainer: "Trainer") -> Tensor:
        return self._full(trainer, 1.0)

    def apply(self, local: Tensor, inputs: StepInputs, step: int, trainer: "Trainer") -> StepInputs:
        weights = local if inputs.example_weights is None else inputs.example_weights * local
        return replace(inputs, example_weights=weights)


class WeightDecay(Global):
    """``weight_decay``: the scalar weight decay ``λ`` (default: the run's ``weight_decay``)."""

    name = "weight_decay"

    def shape(self, trainer: "Trainer") -> tuple[int, ...]:
        return ()

    def default(self, trainer: "Trainer") -> Tensor:
        return self._full(trainer, trainer.weight_decay)

    def check(self, value: Tensor, trainer: "Trainer") -> None:
        super().check(value, trainer)
        if value.item() < 0:
            raise UserError(f"weight_decay must be >= 0, got {value.item()}")

    def apply(self, local: Tensor, inputs: StepInputs, step: int, trainer: "Trainer") -> StepInputs:
        return replace(inputs, weight_decay=local)


METAPARAMS: dict[str, type[MetaParam]] = {}


def register_metaparam(cls: type[MetaParam]) -> type[MetaParam]:
    """Make a kind available by name (usable as a class decorator)."""
    METAPARAMS[cls.name] = cls
    return cls


for _cls in (LRMultipliers, LRKnots, DataWeights, WeightDecay):
    register_metaparam(_cls)


def resolve_metaparams(
    kinds: Mapping[str, MetaParam] | Iterable[Union[str, MetaParam]],
) -> dict[str, MetaParam]:
    """Turn names and/or instances into an ordered ``name → instance`` mapping."""
    if isinstance(kinds, Mapping):
        items = list(kinds.values())
    else:
        items = list(kinds)
    resolved: dict[str, MetaParam] = {}
    for item in items:
        if isinstance(item, str):
            if item not in METAPARAMS:
                raise UserError(
                    f"unknown metaparameter {item!r}; choose from {', '.join(METAPARAMS)}"
                )
            item = METAPARAMS[item]()
        if not isinstance(item, MetaParam):
            raise TypeError(f"expected a metaparameter name or MetaParam, got {item!r}")
        if item.name in resolved:
            raise UserError(f"metaparameter {item.name!r} is listed twice")
        resolved[item.name] = item
    return resolved
