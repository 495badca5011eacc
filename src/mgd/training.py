"""The functional training core: a pure, deterministic step over an explicit state.

Training is ``s_{t+1} = h_t(s_t, z)`` for ``t = 0 .. T-1`` (``method.md`` §1). Here

* the state :class:`TrainState` holds the flat parameter vector, the optimizer's tensors and
  the step count: everything step ``t`` reads;
* ``z`` is a mapping from metaparameter names to tensors (:mod:`mgd.metaparams`);
* the minibatch of step ``t`` is a pure function of ``(seed, t)`` (:meth:`Trainer.batch_indices`),
  so a replayed step reproduces the original bit for bit.

The model is any ``nn.Module`` without buffers, run through ``torch.func.functional_call`` on
views of the flat parameter vector. Keeping the parameters (and every optimizer moment) as one
flat tensor makes the optimizer a handful of vector operations and a checkpoint a few
``clone`` calls.

NOTE [determinism]: every step is a deterministic function of its inputs on a fixed device,
dtype and thread count. ``mgd`` never reads a global RNG during training; the CLI fixes the
thread count. The REPLAY engine fingerprints every state and refuses a replay that diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mgd.errors import UserError
from mgd.metaparams import MetaParam, StepInputs, resolve_metaparams
from mgd.optim import Optimizer

__all__ = ["TrainState", "Trainer", "cross_entropy_objective", "accuracy"]


@dataclass(frozen=True)
class TrainState:
    """Everything step ``step`` reads: ``params`` (flat), ``opt_state`` and the step count."""

    params: Tensor
    opt_state: tuple[Tensor, ...]
    step: int

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.params, *self.opt_state)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], step: int) -> "TrainState":
        return cls(tensors[0], tuple(tensors[1:]), step)

    def detached(self) -> "TrainState":
        """A detached copy that shares no storage with ``self`` (a checkpoint)."""
        return TrainState.from_tensors(tuple(t.detach().clone() for t in self.tensors()), self.step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class Trainer:
    """A training run as a pure step function.

    Args:
        model: an ``nn.Module`` without buffers; its current parameters are the initial ones.
        optimizer: an :mod:`mgd.optim` optimizer.
        x_train, y_train: the training set (features, integer labels), on the training device.
        steps: number of optimizer steps ``T``.
        batch_size: examples per step; each epoch is a fresh permutation and the last
            incomplete batch of an epoch is dropped.
        lr: base learning rate; the ``lr`` and ``lr_knots`` metaparameters multiply it.
        weight_decay: default weight decay (the ``weight_decay`` metaparameter replaces it).
        seed: seeds the batch order.
        metaparams: the kinds of metaparameters this run has (names from
            :data:`mgd.metaparams.METAPARAMS`, or instances). Their values are passed to
            :meth:`step`; a missing value means the kind's neutral default.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mgd import Trainer, SGD
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> trainer = Trainer(model, SGD(momentum=0.9), x, y, steps=5, batch_size=10, lr=0.1)
        >>> state = trainer.run()
        >>> state.step
        5
    """

    model: nn.Module
    optimizer: Optimizer
    x_train: Tensor
    y_train: Tensor
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    metaparams: Mapping[str, MetaParam] | tuple = ()
    _names: tuple[str, ...] = field(init=False, repr=False)
    _shapes: tuple[torch.Size, ...] = field(init=False, repr=False)
    _numels: tuple[int, ...] = field(init=False, repr=False)
    _epoch_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        buffers = [name for name, _ in self.model.named_buffers()]
        if buffers:
            raise UserError(
                f"the model has buffers ({', '.join(buffers[:3])}{'...' if len(buffers) > 3 else ''}), "
                "which the training core does not carry yet; use a model without buffers "
                "(e.g. GroupNorm or LayerNorm instead of BatchNorm)"
            )
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        n = len(self.x_train)
        if len(self.y_train) != n:
            raise UserError(f"x_train has {n} rows but y_train has {len(self.y_train)}")
        if not 1 <= self.batch_size <= n:
            raise UserError(
                f"batch size must be between 1 and the training-set size {n}, got {self.batch_size}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")
        named = [(name, p) for name, p in self.model.named_parameters()]
        self._names = tuple(name for name, _ in named)
        self._shapes = tuple(p.shape for _, p in named)
        self._numels = tuple(p.numel() for _, p in named)
        self.metaparams = resolve_metaparams(self.metaparams)

    # ----------------------------------------------------------------------------- model
    @property
    def dtype(self) -> torch.dtype:
        return self.x_train.dtype

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def num_params(self) -> int:
        return sum(self._numels)

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    def flat_params(self) -> Tensor:
        """The model's current parameters as one flat vector (the initial ``θ_0``)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).to(
            device=self.device, dtype=self.dtype
        )

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` shaped like the model's parameters, keyed by name."""
        chunks = flat.split(self._numels)
        return {name: c.view(shape) for name, c, shape in zip(self._names, chunks, self._shapes)}

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        """The model's output at parameters ``flat``."""
        return functional_call(self.model, self.unflatten(flat), (x,))

    # ----------------------------------------------------------------------------- data
    def batch_indices(self, step: int) -> Tensor:
        """Indices of the minibatch of ``step``: a pure function of ``(seed, step)``.

        Epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``; step
        ``t`` takes slice ``t mod (N // B)`` of epoch ``t // (N // B)``.
        """
        per_epoch = self.num_train // self.batch_size
        epoch, position = divmod(step, per_epoch)
        perm = self._epoch_cache.get(epoch)
        if perm is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            perm = torch.as_tensor(order, dtype=torch.long, device=self.device)
            self._epoch_cache.clear()  # one epoch at a time is enough for replays
            self._epoch_cache[epoch] = perm
        return perm[position * self.batch_size : (position + 1) * self.batch_size]

    # ----------------------------------------------------------------------------- steps
    def init_state(self) -> TrainState:
        params = self.flat_params()
        return TrainState(params, tuple(self.optimizer.init(params)), 0)

    def default_meta(self) -> dict[str, Tensor]:
        """The neutral value of every metaparameter kind of this run."""
        return {name: mp.default(self) for name, mp in self.metaparams.items()}

    def check_meta(self, meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Validate metaparameter values and fill in defaults; returns a complete mapping."""
        unknown = sorted(set(meta) - set(self.metaparams))
        if unknown:
            raise UserError(
                f"metaparameter(s) {', '.join(unknown)} are not part of this run; it has "
                f"{', '.join(self.metaparams) or 'none'}"
            )
        values = {}
        for name, mp in self.metaparams.items():
            if name in meta:
                value = torch.as_tensor(meta[name]).to(device=self.device, dtype=self.dtype)
                mp.check(value, self)
            else:
                value = mp.default(self)
            values[name] = value
        return values

    def step_inputs(self, step: int, local: Mapping[str, Tensor]) -> StepInputs:
        """What step ``step`` consumes, after every metaparameter has acted on it.

        ``local`` holds each metaparameter's slice for this step (:meth:`MetaParam.local`).
        """
        index = self.batch_indices(step)
        inputs = StepInputs(
            index=index,
            x=self.x_train[index],
            y=self.y_train[index],
            example_weights=None,
            lr=torch.tensor(self.lr, dtype=self.dtype, device=self.device),
            weight_decay=self.weight_decay,
        )
        for name, mp in self.metaparams.items():
            inputs = mp.apply(local[name], inputs, step, self)
        return inputs

    def local_meta(self, meta: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        index = self.batch_indices(step)
        return {name: mp.local(meta[name], step, index) for name, mp in self.metaparams.items()}

    def batch_loss(self, params: Tensor, inputs: StepInputs) -> Tensor:
        """Minibatch loss ``(1/B) Σ_i w_i CE_i`` (``w_i = 1`` without data weights)."""
        losses = F.cross_entropy(self.forward(params, inputs.x), inputs.y, reduction="none")
        if inputs.example_weights is not None:
            losses = inputs.example_weights * losses
        return losses.sum() / len(losses)

    def differentiable_step(
        self, state_tensors: tuple[Tensor, ...], step: int, local: Mapping[str, Tensor]
    ) -> tuple[Tensor, ...]:
        """One step with a graph: ``h_t`` as a differentiable function of state and ``local``.

        The inner gradient is taken with ``create_graph=True`` so the result can be
        differentiated again (the double-backward per-step VJP of ``method.md`` §3.1).
        """
        params, *opt_state = state_tensors
        inputs = self.step_inputs(step, local)
        (grad,) = torch.autograd.grad(self.batch_loss(params, inputs), params, create_graph=True)
        new_params, new_opt = self.optimizer.update(
            grad, params, tuple(opt_state), step=step, lr=inputs.lr, weight_decay=inputs.weight_decay
        )
        return (new_params, *new_opt)

    def step(self, state: TrainState, meta: Mapping[str, Tensor]) -> TrainState:
        """``s_{t+1} = h_t(s_t, z)``: one training step, no graph kept, inputs untouched."""
        t = state.step
        if t >= self.steps:
            raise IndexError(f"step {t} is past the end of training (T={self.steps})")
        with torch.no_grad():
            inputs = self.step_inputs(t, self.local_meta(meta, t))
        params = state.params.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.batch_loss(params, inputs), params)
        with torch.no_grad():
            new_params, new_opt = self.optimizer.update(
                grad, state.params, state.opt_state, step=t, lr=inputs.lr,
                weight_decay=inputs.weight_decay,
            )
        return TrainState(new_params, tuple(new_opt), t + 1)

    def run(
        self,
        meta: Mapping[str, Tensor] | None = None,
        *,
        state: TrainState | None = None,
        until: int | None = None,
        callback: Callable[[TrainState], None] | None = None,
    ) -> TrainState:
        """Train from ``state`` (default: the initial state) up to step ``until`` (default T)."""
        meta = self.check_meta(meta or {})
        state = self.init_state() if state is None else state
        until = self.steps if until is None else until
        while state.step < until:
            state = self.step(state, meta)
            if callback is not None:
                callback(state)
        return state


def cross_entropy_objective(
    model: nn.Module, x: Tensor, y: Tensor
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``φ(θ)``: mean cross-entropy of ``model`` with parameters ``θ`` (a name → tensor dict)."""

    def objective(params: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, dict(params), (x,)), y)

    return objective


@torch.no_grad()
def accuracy(trainer: Trainer, flat: Tensor, x: Tensor, y: Tensor) -> float:
    """Fraction of ``(x, y)`` classified correctly at flat parameters ``flat`` (not differentiated)."""
    return (trainer.forward(flat, x).argmax(dim=1) == y).double().mean().item()
