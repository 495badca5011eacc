"""Metaparameters: named tensors ``z`` that shape training and whose metagradient we return.

A metaparameter kind is a small object with these methods (``method.md`` §3.3):

* ``default(run)``: its neutral value (training is unchanged at it);
* ``check(value, run)``: raise :class:`~mgd.errors.UserError` for a bad value;
* ``neutral(value)`` (optional): whether the value is an exact identity (all-one weights), which
  a step that records no graph skips;
* ``local(value, step, index)``: the slice step ``step`` reads (differentiable in ``value``),
  e.g. ``value[step]`` for per-step LR multipliers or ``value[index]`` for per-example weights;
* ``apply(local, inputs, step, run)``: return the :class:`StepInputs` changed by it;
* ``accumulate(total, local_grad, step, index)``: add the slice's gradient into the full
  gradient (the adjoint of ``local``).

``run`` is a :class:`RunInfo` (steps, examples, dtype, device, base hyperparameters, the
data), not the training run itself. The reverse pass only ever calls these methods, so a new kind (say, additive perturbations of
the training inputs) is one subclass plus :func:`register_metaparam`; nothing in
:mod:`mgd.replay` changes. The per-step cost stays proportional to the slice, not to ``z``.

Built-in kinds, with :math:`\\eta_\\text{base}` the base learning rate:

* ``lr``: per-step multipliers ``z ∈ R^T``, :math:`\\eta_t = \\eta_\\text{base}\\, z_t`;
* ``lr_knots``: ``K`` piecewise-linear knots of the log-LR multiplier, evenly spaced over the
  run, :math:`\\eta_t = \\eta_\\text{base} \\exp(\\sum_j w_j(t)\\,\\ell_j)` with hat weights ``w_j``
  (log space keeps ``η > 0`` without projection; all-zero knots leave the run unchanged);
* ``data_weights``: one weight per training example, loss :math:`\\frac1B\\sum_{i\\in B_t} w_i\\,\\ell_i`;
* ``weight_decay``: the scalar weight decay :math:`\\lambda` (default: the run's value);
* ``pool_injection`` (:class:`PoolInjection`, built with its step): the paper's data-selection
  surrogate, one weight per training example that adds the whole training set to one step.

All kinds that a run declares act at once; ``lr`` and ``lr_knots`` multiply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterable, Mapping, Union

import torch
from torch import Tensor

from mgd.batches import Field, concat_batches, get_field, set_field
from mgd.errors import UserError

__all__ = [
    "StepInputs",
    "RunInfo",
    "MetaParam",
    "PerStep",
    "PerExample",
    "Global",
    "LRMultipliers",
    "LRKnots",
    "DataWeights",
    "WeightDecay",
    "PoolInjection",
    "METAPARAMS",
    "register_metaparam",
    "resolve_metaparams",
]


@dataclass(frozen=True)
class StepInputs:
    """What one training step consumes.

    Attributes:
        index: indices of the minibatch's examples in the training data (this rank's shard).
        batch: the minibatch, a tensor or nested tuple/dict of tensors (``(x, y)`` for
            :class:`~mgd.training.Trainer`); metaparameters that change inputs (poisons)
            replace a field of it.
        example_weights: per-example loss weights, or ``None`` for all ones.
        lr: the learning rate of this step (0-dim tensor).
        weight_decay: the weight decay of this step (float or 0-dim tensor).
        batch_size: the full minibatch size ``B`` the loss is averaged over; with data
            parallelism (:mod:`mgd.distributed`) ``index`` is this rank's shard of it.
            ``None``: ``len(index)``.
    """

    index: Tensor
    batch: Any
    example_weights: Tensor | None
    lr: Tensor
    weight_decay: Union[float, Tensor]
    batch_size: int | None = None

    @property
    def x(self) -> Tensor:
        """The first field of the batch (the inputs of an ``(x, y)`` batch)."""
        return get_field(self.batch, 0) if not isinstance(self.batch, Tensor) else self.batch

    def with_field(self, field: Field, value: Tensor) -> "StepInputs":
        """These inputs with one field of the batch replaced (``field`` as in :mod:`mgd.batches`)."""
        return replace(self, batch=set_field(self.batch, field, value))


@dataclass(frozen=True)
class RunInfo:
    """What a metaparameter kind may know about the run it acts on.

    Attributes:
        steps: the number of steps ``T``.
        num_train: the number of training examples ``N``.
        dtype, device: of the trainable parameters.
        lr, weight_decay: the base learning rate and weight decay.
        data: the training data (:class:`~mgd.batches.TensorData` or
            :class:`~mgd.batches.DatasetData`); ``data.field(f)`` is one column of it.
    """

    steps: int
    num_train: int
    dtype: torch.dtype
    device: torch.device
    lr: float
    weight_decay: float
    data: Any = None


class MetaParam(ABC):
    """Protocol for one kind of metaparameter (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def shape(self, run: RunInfo) -> tuple[int, ...]:
        """The full value's shape."""

    @abstractmethod
    def default(self, run: RunInfo) -> Tensor:
        """The neutral value, on the run's device and dtype."""

    @abstractmethod
    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        """The part of ``value`` that step ``step`` (minibatch ``index``) reads."""

    @abstractmethod
    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        """``total += (∂ local / ∂ value)ᵀ local_grad``, in place."""

    @abstractmethod
    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        """How the slice changes what the step consumes."""

    def neutral(self, value: Tensor) -> bool:
        """Whether acting with ``value`` changes no number a step computes, bit for bit (a
        multiplier of exactly one), so that a step recording no graph may skip this kind.

        ``False`` unless a kind knows better: the default is always safe."""
        return False

    def check_run(self, run: RunInfo) -> None:
        """Raise :class:`~mgd.errors.UserError` if this kind cannot act on the run (called once,
        when the run is built)."""

    def check(self, value: Tensor, run: RunInfo) -> None:
        """Reject values of the wrong shape or with NaN/inf (subclasses may add more)."""
        expected = tuple(self.shape(run))
        if tuple(value.shape) != expected:
            raise UserError(
                f"metaparameter {self.name!r} must have shape {expected}, got {tuple(value.shape)}"
                + _shape_hint(self.name, expected)
            )
        if not torch.isfinite(value).all():
            raise UserError(f"metaparameter {self.name!r} contains NaN or infinite values")

    def _full(self, run: RunInfo, fill: float) -> Tensor:
        return torch.full(self.shape(run), fill, dtype=run.dtype, device=run.device)


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

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return (run.steps,)

    def default(self, run: RunInfo) -> Tensor:
        return self._full(run, 1.0)

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        return replace(inputs, lr=inputs.lr * local)

    def neutral(self, value: Tensor) -> bool:
        return bool((value == 1).all())  # η · 1 = η exactly


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

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return (self.num_knots,)

    def default(self, run: RunInfo) -> Tensor:
        return self._full(run, 0.0)

    @staticmethod
    def hat_weights(step: int, steps: int, num_knots: int) -> tuple[int, float]:
        """``(j, α)`` such that the log multiplier at ``step`` is ``(1-α) ℓ_j + α ℓ_{j+1}``."""
        if num_knots == 1 or steps == 1:
            return 0, 0.0
        position = step * (num_knots - 1) / (steps - 1)
        j = min(int(position), num_knots - 2)
        return j, position - j

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        j, alpha = self.hat_weights(step, run.steps, self.num_knots)
        log_multiplier = local[j] if alpha == 0.0 else (1.0 - alpha) * local[j] + alpha * local[j + 1]
        return replace(inputs, lr=inputs.lr * torch.exp(log_multiplier))

    def neutral(self, value: Tensor) -> bool:
        return bool((value == 0).all())  # (1-α)·0 + α·0 = 0 and exp(0) = 1 exactly


class DataWeights(PerExample):
    """``data_weights``: per-example loss weights (default all ones)."""

    name = "data_weights"

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return (run.num_train,)

    def default(self, run: RunInfo) -> Tensor:
        return self._full(run, 1.0)

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        weights = local if inputs.example_weights is None else inputs.example_weights * local
        return replace(inputs, example_weights=weights)

    def neutral(self, value: Tensor) -> bool:
        return bool((value == 1).all())  # 1 · ℓ_i = ℓ_i exactly: the same as no weights


class WeightDecay(Global):
    """``weight_decay``: the scalar weight decay ``λ`` (default: the run's ``weight_decay``)."""

    name = "weight_decay"

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return ()

    def default(self, run: RunInfo) -> Tensor:
        return self._full(run, run.weight_decay)

    def check(self, value: Tensor, run: RunInfo) -> None:
        super().check(value, run)
        if value.item() < 0:
            raise UserError(f"weight_decay must be >= 0, got {value.item()}")

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        return replace(inputs, weight_decay=local)


class PoolInjection(MetaParam):
    """``pool_injection``: the data-selection surrogate of the paper (``method.md`` §3.3, §6.1).

    Step ``t_inj`` (:attr:`step`) gets an extra :math:`\\frac1B\\sum_{i=1}^{N} z_i\\,\\ell_i(\\theta)`
    over *every* training example, the rest of the run is untouched, and ``z`` defaults to 0,
    so at the default the run trains as before. Its metagradient at ``z = 0`` is

    .. math:: \\bar z_i = \\tfrac1B\\, a_{t_\\text{inj}} \\cdot \\nabla_\\theta \\ell_i(\\theta_{t_\\text{inj}}),

    with ``a`` the adjoint reaching step ``t_inj``'s gradient: how upweighting each example at
    that one step would move the objective. Unlike ``data_weights`` it covers examples whose
    weight is 0 (dropped ones can come back), and only the steps from ``t_inj`` on need a
    reverse pass (differentiate with ``horizon = T - t_inj``).

    The step appends the whole training set to its minibatch (after every other kind has
    acted, before augmentation), so it costs one pass over the data at that step. At the
    default the loss and gradient equal the plain step's up to summation order; BatchNorm in
    train mode would see the appended examples, so :meth:`check_run` refuses such runs.
    """

    name = "pool_injection"
    #: appended to the minibatch: applied after the kinds that change the minibatch's own rows
    appends_examples = True

    def __init__(self, step: int) -> None:
        if not (isinstance(step, int) and step >= 0):
            raise UserError(f"the injection step must be an integer >= 0, got {step!r}")
        self.step = step

    def shape(self, run: RunInfo) -> tuple[int, ...]:
        return (run.num_train,)

    def default(self, run: RunInfo) -> Tensor:
        return self._full(run, 0.0)

    def check_run(self, run: RunInfo) -> None:
        if self.step >= run.steps:
            raise UserError(f"the injection step {self.step} is past the run's last step {run.steps - 1}")

    def local(self, value: Tensor, step: int, index: Tensor) -> Tensor:
        return value if step == self.step else value[:0]

    def accumulate(self, total: Tensor, local_grad: Tensor, step: int, index: Tensor) -> None:
        if step == self.step:
            total += local_grad

    def apply(self, local: Tensor, inputs: StepInputs, step: int, run: RunInfo) -> StepInputs:
        if step != self.step:
            return inputs
        pool = torch.arange(run.num_train, device=inputs.index.device)
        own = (torch.ones(len(inputs.index), dtype=local.dtype, device=local.device)
               if inputs.example_weights is None else inputs.example_weights)
        return replace(
            inputs,
            index=torch.cat([inputs.index, pool]),
            batch=concat_batches(inputs.batch, run.data.batch(pool)),
            example_weights=torch.cat([own, local]),
            batch_size=inputs.batch_size or len(inputs.index),  # the loss stays a mean over B
        )


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
