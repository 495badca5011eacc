r"""The one training step: ``s_{t+1} = h_t(s_t, z)`` for any PyTorch training run.

A :class:`TrainingRun` holds what defines a run (the user's module, per-example loss, data,
optimizer, schedule, clipping, micro-batches, metaparameter kinds, data parallelism) and
offers a few pure views of step ``t``, which every other part of ``mgd`` calls: the forward
pass and every replay, the per-step VJPs (:mod:`mgd.step_vjp`), the full-unroll reference
(:mod:`mgd.check`) and the applications. The step is written here once.

* :meth:`TrainingRun.step_inputs`: the minibatch (read by index in a pure order, changed by
  the metaparameters, then augmented with a generator seeded from ``(seed, t, rank)``), the
  step's learning rate and weight decay, the example weights;
* :meth:`TrainingRun.gradient` / :meth:`TrainingRun.update`: the minibatch gradient
  ``g_t = Σ_chunks ∇_θ (1/B) Σ_{i ∈ chunk} w_i ℓ_i`` (micro-batches, summed over ranks), then
  clipping and the optimizer;
* :meth:`TrainingRun.step`: both, no graph kept (training, replays);
* :meth:`TrainingRun.linearize`: the gradient with its graph (``create_graph=True``) for a
  second differentiation, :meth:`TrainingRun.next_state` the state it leads to;
* :meth:`TrainingRun.update_pullback`: the update's VJP in closed form.

The step of a run with learning rate :math:`\eta`, base schedule :math:`s(t)` and global-norm
clipping at :math:`c` is

.. math::
    \eta_t = \eta\, s(t)\, m_t,\qquad
    \hat g = g\,\min\!\Big(1, \frac{c}{\lVert g\rVert + 10^{-6}}\Big),\qquad
    (\theta', o') = U(\hat g, \theta, o; \eta_t, \lambda),

with ``m_t`` what the ``lr``/``lr_knots`` metaparameters multiply in (``torch.nn.utils.
clip_grad_norm_``'s formula for the clipping).

NOTE [randomness]: nothing in a step reads a global random stream. Augmentation receives a
``torch.Generator`` seeded with :func:`~mgd.batches.step_seed` of ``(seed, t, rank)``; the
model (dropout) runs with torch's CPU generator (and the device's, on CUDA) seeded with
another such seed per micro-batch, and both generators are restored afterwards. A replayed
step therefore draws the same masks; the REPLAY engine checks it (the per-example losses of
every recomputation are fingerprinted against the forward pass).

NOTE [attention]: PyTorch's fused attention kernels (flash, memory-efficient) have no double
backward. Every training forward runs under the math backend of
``scaled_dot_product_attention`` (:func:`math_attention`), in the forward pass too, so that
the replays with a graph compute the same bits.

NOTE [determinism]: a step is a deterministic function of its inputs on a fixed device, dtype
and thread count; the engine fingerprints every state and refuses a replay that diverged.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from mgd.batches import (
    AUGMENT_STREAM, MODEL_STREAM, Batch, BatchOrder, DatasetData, TensorData, as_data, step_seed, tree_map,
)
from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.errors import UserError
from mgd.losses import Loss, cross_entropy, model_inputs
from mgd.metaparams import MetaParam, RunInfo, StepInputs, resolve_metaparams
from mgd.optim import Optimizer
from mgd.stateless import StatelessModel, Trainable

__all__ = [
    "TrainState", "TrainingRun", "GradGraph", "StepResult", "make_run", "math_attention",
    "clip_by_global_norm", "clip_vjp", "refuse_tf32", "second_backward",
]

Schedule = Callable[[int, int], float]
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


@dataclass(frozen=True)
class TrainState:
    """Everything step ``step`` reads.

    Attributes:
        params: the flat vector of trainable parameters (frozen ones are constants of the run).
        opt_state: the optimizer's tensors (flat, like ``params``).
        buffers: the flat BatchNorm running statistics; empty when the model has none.
        step: the number of steps taken.
    """

    params: Tensor
    opt_state: tuple[Tensor, ...]
    buffers: Tensor
    step: int

    def tensors(self) -> tuple[Tensor, ...]:
        """``(params, *opt_state, buffers)``: the differentiable part of the state."""
        return (self.params, *self.opt_state, self.buffers)

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], step: int) -> "TrainState":
        return cls(tensors[0], tuple(tensors[1:-1]), tensors[-1], step)

    def detached(self) -> "TrainState":
        """A detached copy that shares no storage with ``self`` (a checkpoint)."""
        return TrainState.from_tensors(tuple(t.detach().clone() for t in self.tensors()), self.step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass(frozen=True)
class StepResult:
    """A step taken without a graph: the new state, the gradient it used, its losses.

    ``grad`` is ``g_t`` summed over ranks (before clipping); ``losses`` the per-example
    losses of this rank's examples, detached (what the engine fingerprints).
    """

    state: TrainState
    grad: Tensor
    losses: Tensor


@dataclass
class GradGraph:
    """Step ``step``'s minibatch gradient with the graph that differentiates it once more.

    Only the gradient computation is recorded (``create_graph=True``); the optimizer update,
    a few elementwise operations, is pulled back in closed form. A kept graph therefore holds
    the activations and the gradient, not the update's temporaries.

    Attributes:
        params, buffers: leaves aliasing ``s_t``'s parameters and buffers (no copies).
        leaves: the metaparameter slices (leaves for those differentiated).
        inputs: what the step consumed (``lr``, ``weight_decay``, the example weights and the
            batch keep their graph to ``leaves``).
        grad: ``g_t`` (this rank's shard of it), differentiable in ``params`` and ``leaves``.
        full_grad: ``g_t`` summed over ranks, detached: what the update consumes.
        new_buffers: the new BatchNorm statistics, differentiable in ``params`` and ``buffers``.
        losses: the per-example losses, detached (fingerprinted by the engine).
    """

    step: int
    params: Tensor
    buffers: Tensor
    leaves: dict[str, Tensor]
    inputs: StepInputs
    grad: Tensor
    full_grad: Tensor
    new_buffers: Tensor
    losses: Tensor


_ATTENTION = threading.local()


@contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math backend (exact double backward).

    Re-entrant and cheap when already active, so loops may enter it once around many steps.
    """
    if getattr(_ATTENTION, "active", False):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _ATTENTION.active = True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _ATTENTION.active = False


_RNG_SCOPE = threading.local()


def _generators(device: torch.device) -> list[torch.Generator]:
    generators = [torch.default_generator]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generators.append(torch.cuda.default_generators[index])
    return generators


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's CPU generator (and ``device``'s, on CUDA) for a block, then restore them.

    Inside :func:`restored_rng` for the same device the block only seeds: the scope restores
    the generators once at its end, which saves copying their states at every step.
    """
    generators = _generators(device)
    if getattr(_RNG_SCOPE, "device", None) == device:
        for g in generators:
            g.manual_seed(seed)
        yield
        return
    saved = [g.get_state() for g in generators]
    for g in generators:
        g.manual_seed(seed)
    try:
        yield
    finally:
        for g, state in zip(generators, saved):
            g.set_state(state)


@contextmanager
def restored_rng(device: torch.device) -> Iterator[None]:
    """Save torch's generators once around many :func:`seeded_rng` blocks and restore them at
    the end. Only for loops that run nothing random of the user's between those blocks: the
    generators hold the last block's state there. Re-entrant."""
    if getattr(_RNG_SCOPE, "device", None) is not None:
        yield
        return
    generators = _generators(device)
    saved = [g.get_state() for g in generators]
    _RNG_SCOPE.device = device
    try:
        yield
    finally:
        _RNG_SCOPE.device = None
        for g, state in zip(generators, saved):
            g.set_state(state)


def clip_by_global_norm(grad: Tensor, max_norm: float) -> Tensor:
    """``g · min(1, c / (‖g‖ + 1e-6))``: ``torch.nn.utils.clip_grad_norm_``'s formula."""
    norm = torch.linalg.vector_norm(grad)
    return grad * torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def clip_vjp(grad: Tensor, clipped_bar: Tensor, max_norm: float) -> Tensor:
    r"""The VJP of :func:`clip_by_global_norm` at ``grad``.

    With ``n = ‖g‖`` and ``κ = c / (n + ε)``: where ``κ ≥ 1`` nothing is clipped and
    ``ḡ = \bar{\hat g}``; else ``ḡ = κ \bar{\hat g} - \frac{c\,⟨\bar{\hat g}, g⟩}{(n+ε)^2 n} g``.
    """
    norm = torch.linalg.vector_norm(grad)
    coef = max_norm / (norm + CLIP_EPS)
    if bool(coef >= 1.0):
        return clipped_bar
    inner = (clipped_bar * grad).sum()
    return coef * clipped_bar - (max_norm * inner / ((norm + CLIP_EPS) ** 2 * norm)) * grad


def refuse_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse float32 on CUDA with TF32 on: products would round to 10-bit mantissas."""
    if device.type == "cuda" and dtype == torch.float32 and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        raise UserError(
            "TF32 is on: float32 matrix products and convolutions would round to 10-bit "
            "mantissas, so metagradients are not exact; set torch.backends.cuda.matmul."
            "allow_tf32 = False and torch.backends.cudnn.allow_tf32 = False"
        )


def _inputs_convention(inputs) -> Callable[[Batch], tuple[tuple, dict]]:
    if inputs is None:
        return model_inputs
    if callable(inputs):
        return inputs
    if isinstance(inputs, (tuple, list)) and all(isinstance(k, str) for k in inputs):
        keys = tuple(inputs)
        return lambda batch: ((), {k: batch[k] for k in keys})
    raise UserError("inputs= must be a function batch -> (args, kwargs) or a tuple of batch keys")


class TrainingRun:
    """A training run as a pure step function over an explicit :class:`TrainState`.

    Args:
        model: any ``nn.Module``; its current parameters and buffers are the initial ones.
            Training runs a private copy of it in train mode (:class:`~mgd.stateless.StatelessModel`).
        optimizer: an :mod:`mgd.optim` optimizer.
        data: the training examples: in-memory tensors (``(x, y)``, a dict of tensors, ...), a
            map-style ``torch.utils.data.Dataset`` (read by index, ``collate_fn``), or a
            :class:`~mgd.batches.TensorData` / :class:`~mgd.batches.DatasetData`.
        steps: number of optimizer steps ``T``.
        batch_size: examples per step (each epoch is a fresh permutation; the last incomplete
            batch of an epoch is dropped).
        lr: base learning rate; the schedule and the ``lr`` / ``lr_knots`` metaparameters
            multiply it.
        loss: ``loss(outputs, batch) -> (B,)`` per-example losses (default:
            :func:`mgd.losses.cross_entropy`).
        inputs: how a batch becomes ``model(*args, **kwargs)``: a function, or a tuple of dict
            keys (default :func:`mgd.losses.model_inputs`).
        weight_decay: default weight decay (the ``weight_decay`` metaparameter replaces it).
        seed: seeds the batch order, the augmentation and the model's randomness (dropout).
        schedule: base LR multiplier ``s(t, T)`` (e.g. :func:`mgd.schedules.warmup_cosine`).
        warmup_steps: linear warm-up ``min(1, (t + 1) / warmup_steps)``, on top of ``schedule``.
        clip_norm: clip the minibatch gradient to this global 2-norm (differentiable).
        micro_batch: examples per micro-batch: the gradient is accumulated over chunks, so
            one step's activation memory is that of a micro-batch (also in the reverse pass).
        trainable: ``(name, parameter) -> bool``; default ``parameter.requires_grad``. The
            others are constants, never updated or checkpointed.
        augment: ``augment(batch, generator) -> batch``, applied after the metaparameters;
            ``generator`` is seeded from ``(seed, step, rank)``. Must be differentiable in the
            fields a metaparameter changes.
        metaparams: the kinds of metaparameters (names from :data:`mgd.metaparams.METAPARAMS`
            or instances).
        collective: data parallelism (:mod:`mgd.distributed`); default one process.
        collate_fn: for a ``Dataset``: examples → batch (default
            :func:`mgd.batches.default_collate`).
        batch_order: ``step -> indices`` of that step's minibatch, a pure function of the step
            (default :class:`~mgd.batches.BatchOrder`: seeded epoch permutations); e.g. to
            reproduce another library's sampler.

    Raises:
        UserError: for bad settings (see each argument), a model in half precision, TF32 on,
            a ``DataLoader`` instead of a ``Dataset``, or a dataset whose items change between
            two reads.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        data,
        *,
        steps: int,
        batch_size: int,
        lr: float,
        loss: Loss | None = None,
        inputs=None,
        weight_decay: float = 0.0,
        seed: int = 0,
        schedule: Schedule | None = None,
        warmup_steps: int = 0,
        clip_norm: float | None = None,
        micro_batch: int | None = None,
        trainable: Trainable | None = None,
        augment: Callable[[Batch, torch.Generator], Batch] | None = None,
        metaparams: Mapping[str, MetaParam] | Sequence = (),
        collective: Collective = SINGLE_PROCESS,
        collate_fn: Callable | None = None,
        batch_order: Callable[[int], Tensor] | None = None,
    ):
        # what built this run, so that :meth:`replaced` can build another with a change
        self._arguments = {
            "model": model, "optimizer": optimizer, "steps": steps, "batch_size": batch_size, "lr": lr,
            "loss": loss, "inputs": inputs, "weight_decay": weight_decay, "seed": seed, "schedule": schedule,
            "warmup_steps": warmup_steps, "clip_norm": clip_norm, "micro_batch": micro_batch,
            "trainable": trainable, "augment": augment, "metaparams": metaparams, "collective": collective,
            "batch_order": batch_order,
        }
        self.model = model
        self.stateless = StatelessModel(model, trainable)
        self.optimizer = optimizer
        self.data = as_data(data, collate_fn=collate_fn)
        self.steps, self.batch_size, self.lr = int(steps), int(batch_size), float(lr)
        self.loss = loss or cross_entropy
        self.inputs_of = _inputs_convention(inputs)
        self.weight_decay, self.seed = float(weight_decay), int(seed)
        self.schedule, self.warmup_steps = schedule, int(warmup_steps)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self.augment = augment
        self.collective = collective
        self._validate()
        self.order = BatchOrder(len(self.data), self.batch_size, self.seed, device=self.device)
        self._batch_order = batch_order
        self._shard_cache: tuple[int, Tensor] | None = None
        self._lr_cache: tuple[float, Tensor] | None = None
        self._arguments["data"] = self.data
        self.metaparams = resolve_metaparams(metaparams)
        # kinds that append examples act last, so the others see only the minibatch's own rows
        self._apply_order = sorted(self.metaparams, key=lambda n: getattr(self.metaparams[n], "appends_examples", False))
        self._check_appending_kinds()
        self.info = RunInfo(self.steps, len(self.data), self.dtype, self.device, self.lr, self.weight_decay, self.data)
        for mp in self.metaparams.values():
            mp.check_run(self.info)
        if isinstance(self.data, DatasetData):
            self.data.check_stable(self.batch_indices(0)[:8].cpu())

    def replaced(self, **changes) -> "TrainingRun":
        """The same run with some of its arguments changed (e.g. ``data=``, ``metaparams=``,
        ``steps=``, ``seed=``): a new :class:`TrainingRun`, built from the same model (so from
        the same initial parameters) and the same settings otherwise."""
        unknown = sorted(set(changes) - set(self._arguments))
        if unknown:
            raise UserError(f"a run has no argument {unknown[0]!r} to replace")
        return TrainingRun(**{**self._arguments, **changes})

    def restricted(self, indices) -> "TrainingRun":
        """The same run trained on the examples at ``indices`` only (a selected subset), for the
        same number of steps; the batch size is cut to the subset's size if larger."""
        if self._batch_order is not None:
            raise UserError(
                "a run with its own batch_order cannot be restricted to a subset of its data; "
                "drop batch_order= to use the default seeded order"
            )
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        if len(index) == 0:
            raise UserError("cannot train on an empty subset")
        if index.min() < 0 or index.max() >= len(self.data):
            raise UserError(f"subset indices must lie in [0, {len(self.data)})")
        return self.replaced(data=self.data.take(index), batch_size=min(self.batch_size, len(index)))

    def _check_appending_kinds(self) -> None:
        """A kind that appends examples to a step's minibatch (:class:`~mgd.metaparams.PoolInjection`)
        leaves the run as it was only if each example's loss ignores the others in its batch."""
        appending = [name for name, mp in self.metaparams.items() if getattr(mp, "appends_examples", False)]
        if not appending:
            return
        if self.stateless.buffer_names:
            raise UserError(
                f"metaparameter {appending[0]!r} adds the training set to one step's batch, which "
                "BatchNorm (or another module with buffers) in train mode would see; use "
                "data_weights for this model instead"
            )
        if self.collective.world_size > 1:
            raise UserError(f"metaparameter {appending[0]!r} cannot run data-parallel; run it on one process")

    def _validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise UserError(f"warm-up steps must be >= 0, got {self.warmup_steps}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise UserError(f"clip norm must be a positive number, got {self.clip_norm}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UserError(f"micro-batch size must be >= 1, got {self.micro_batch}")
        if not 1 <= self.batch_size <= len(self.data):
            raise UserError(
                f"batch size must be between 1 and the training-set size {len(self.data)}, got {self.batch_size}"
            )
        refuse_tf32(self.device, self.dtype)
        if self.collective.world_size > 1:
            if self.stateless.has_buffers:
                raise UserError(
                    "BatchNorm is not supported with more than one process (its batch statistics "
                    "would need synchronising); use --norm none or one process"
                )
            if self.batch_size < self.collective.world_size:
                raise UserError(
                    f"batch size {self.batch_size} is smaller than the {self.collective.world_size} "
                    "processes: every rank needs at least one example per step"
                )

    # ----------------------------------------------------------------------------- model
    @property
    def dtype(self) -> torch.dtype:
        return self.stateless.dtype

    @property
    def device(self) -> torch.device:
        return self.stateless.device

    @property
    def num_params(self) -> int:
        """Number of trainable parameters (the size of ``θ`` in the state)."""
        return self.stateless.num_params

    @property
    def has_buffers(self) -> bool:
        """Whether the model carries BatchNorm running statistics in the state."""
        return self.stateless.has_buffers

    @property
    def num_train(self) -> int:
        return len(self.data)

    def flat_params(self) -> Tensor:
        """The trainable parameters as one flat vector (the initial ``θ_0``)."""
        return self.stateless.initial_params()

    def flat_buffers(self) -> Tensor:
        """The BatchNorm running statistics as one flat vector (may be empty)."""
        return self.stateless.initial_buffers()

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return self.stateless.unflatten(flat)

    def named_tensors(self, params: Tensor, buffers: Tensor) -> dict[str, Tensor]:
        """Trainable parameters and BatchNorm statistics by name (what objectives get)."""
        return self.stateless.named_tensors(params, buffers)

    def predict(self, params: Tensor, buffers: Tensor, *args, **kwargs) -> Any:
        """The model's output in eval mode (BatchNorm uses the running statistics)."""
        return self.stateless.eval_call(params, buffers, args, kwargs)

    # ----------------------------------------------------------------------------- data
    def batch_indices(self, step: int) -> Tensor:
        """Indices of the minibatch of ``step``: a pure function of ``(seed, step)``."""
        if self._batch_order is not None:
            index = torch.as_tensor(self._batch_order(step), dtype=torch.long, device=self.device)
            if index.dim() != 1 or len(index) != self.batch_size:
                raise UserError(f"batch_order({step}) must give {self.batch_size} indices, got shape {tuple(index.shape)}")
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.data)):
                raise UserError(f"batch_order({step}) indexes past the {len(self.data)} training examples")
            return index
        return self.order.indices(step)

    def shard_indices(self, step: int) -> Tensor:
        """This rank's part of the minibatch of ``step``: positions ``rank, rank + W, ...``.

        The last step's answer is kept: a step asks for it several times (its metaparameters'
        slices, its inputs), and the batch order is a pure function of the step."""
        cached = self._shard_cache
        if cached is not None and cached[0] == step:
            return cached[1]
        index = self.batch_indices(step)
        world = self.collective.world_size
        index = index if world == 1 else index[self.collective.rank :: world]
        self._shard_cache = (step, index)
        return index

    def _lr_tensor(self, lr: float) -> Tensor:
        """``lr`` as a 0-dim tensor; the last one is reused (a constant LR needs only one, and
        nothing writes to it)."""
        cached = self._lr_cache
        if cached is None or cached[0] != lr:
            cached = self._lr_cache = (lr, torch.tensor(lr, dtype=self.dtype, device=self.device))
        return cached[1]

    def base_lr(self, step: int) -> float:
        """``η · s(t) · warm-up(t)``: the learning rate before any metaparameter acts."""
        lr = self.lr
        if self.schedule is not None:
            lr = lr * float(self.schedule(step, self.steps))
        if self.warmup_steps:
            lr = lr * min(1.0, (step + 1) / self.warmup_steps)
        return lr

    def step_inputs(self, step: int, local: Mapping[str, Tensor]) -> StepInputs:
        """What step ``step`` consumes, after every metaparameter and the augmentation acted.

        ``local`` holds each metaparameter's slice for this step (:meth:`MetaParam.local`).
        """
        index = self.shard_indices(step)
        inputs = StepInputs(
            index=index,
            batch=self.data.batch(index),
            example_weights=None,
            lr=self._lr_tensor(self.base_lr(step)),
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
        )
        for name in self._apply_order:
            if name in local:  # a step without a graph leaves neutral kinds out (neutral_kinds)
                inputs = self.metaparams[name].apply(local[name], inputs, step, self.info)
        if self.augment is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(self.seed, step, self.collective.rank, AUGMENT_STREAM))
            inputs = replace(inputs, batch=self.augment(inputs.batch, generator))
        return inputs

    # ----------------------------------------------------------------------------- metaparameters
    def default_meta(self) -> dict[str, Tensor]:
        """The neutral value of every metaparameter kind of this run."""
        return {name: mp.default(self.info) for name, mp in self.metaparams.items()}

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
                mp.check(value, self.info)
            else:
                value = mp.default(self.info)
            values[name] = value
        return values

    def local_meta(self, meta: Mapping[str, Tensor], step: int, skip: frozenset[str] = frozenset()) -> dict[str, Tensor]:
        """Each kind's slice for step ``step`` (but those in ``skip``)."""
        index = self.shard_indices(step)
        return {name: mp.local(meta[name], step, index) for name, mp in self.metaparams.items() if name not in skip}

    def neutral_kinds(self, meta: Mapping[str, Tensor]) -> frozenset[str]:
        """The kinds whose values in ``meta`` are exact identities (:meth:`MetaParam.neutral`).

        A step without a graph may leave them out (``take_step(skip=)``) and computes the same
        bits: multiplying by exactly one changes no number. Steps that record a graph keep them,
        as their metagradient is needed."""
        return frozenset(name for name, mp in self.metaparams.items() if mp.neutral(meta[name]))

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """``Σ_r tensor_r`` over the data-parallel ranks (``tensor`` itself with one process)."""
        return tensor if self.collective.world_size == 1 else self.collective.all_reduce_sum(tensor)

    # ----------------------------------------------------------------------------- the loss
    def _chunk_size(self, n: int) -> int:
        """Examples per micro-batch of a step with ``n`` examples on this rank."""
        return n if self.micro_batch is None else min(self.micro_batch, n)

    def chunks(self, inputs: StepInputs) -> list[tuple[int, int]]:
        """``[start, stop)`` positions of the micro-batches of this rank's examples."""
        n = len(inputs.index)
        size = self._chunk_size(n)
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def chunk_losses(
        self, params: Tensor, buffers: Tensor, inputs: StepInputs, step: int, chunk: int, span: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Micro-batch ``chunk`` of step ``step``: its weighted loss sum over ``B``, its
        per-example losses and the new BatchNorm statistics (train mode; differentiable).

        The model runs with torch's generators seeded for ``(seed, step, rank, chunk)``.
        """
        a, b = span
        whole = (a, b) == (0, len(inputs.index))
        batch = inputs.batch if whole else tree_map(lambda t: t[a:b], inputs.batch)
        args, kwargs = self.inputs_of(batch)
        n = len(inputs.index)
        calls = step * -(-n // self._chunk_size(n)) + chunk  # calls before: steps times chunks per step
        seed = step_seed(self.seed, step, self.collective.rank, MODEL_STREAM, chunk)
        with math_attention(), seeded_rng(seed, self.device):
            out, new_buffers = self.stateless.train_call(params, buffers, args, kwargs, calls)
            losses = self.loss(out, batch)
        if not isinstance(losses, Tensor) or losses.shape != (b - a,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise UserError(
                f"the loss must return one value per example, shape ({b - a},); got {shape}: "
                "reduce per-token losses to one per example (e.g. mgd.losses.causal_lm) and do not "
                "average over the batch"
            )
        weighted = losses
        if inputs.example_weights is not None:
            weights = inputs.example_weights if whole else inputs.example_weights[a:b]
            weighted = weights * losses
        return weighted.sum() / (inputs.batch_size or len(inputs.index)), losses, new_buffers

    # ----------------------------------------------------------------------------- the step
    def accumulate_gradient(
        self, params: Tensor, buffers: Tensor, inputs: StepInputs, step: int, *, create_graph: bool,
        entering: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``Σ_chunks ∇_θ (loss of the chunk)`` on this rank, the new BatchNorm statistics and
        the per-example losses (detached). With ``create_graph`` the gradient keeps its graph;
        ``entering`` (a list) receives the statistics each micro-batch starts from.

        The one loop over micro-batches, so a step computed with and without a graph adds the
        same terms in the same order.
        """
        grad, losses = None, []
        with torch.enable_grad():
            for c, span in enumerate(self.chunks(inputs)):
                if entering is not None:
                    entering.append(buffers)
                loss, chunk_losses, buffers = self.chunk_losses(params, buffers, inputs, step, c, span)
                if create_graph:
                    (g,) = second_order_grad(loss, params, self.stateless.module)
                else:
                    (g,) = torch.autograd.grad(loss, params)
                    buffers = buffers.detach()
                grad = g if grad is None else grad + g
                losses.append(chunk_losses.detach())
        return grad, buffers, torch.cat(losses) if len(losses) > 1 else losses[0]

    def gradient(
        self, state: TrainState, inputs: StepInputs, entering: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(g_t summed over ranks, new buffers, per-example losses)`` with no graph kept
        (``entering``: as for :meth:`accumulate_gradient`)."""
        params = state.params.detach().requires_grad_(True)
        grad, buffers, losses = self.accumulate_gradient(
            params, state.buffers.detach(), inputs, state.step, create_graph=False, entering=entering
        )
        return self.sum_over_ranks(grad), buffers.detach(), losses

    def update(
        self, state: TrainState, grad: Tensor, inputs: StepInputs, new_buffers: Tensor, donate: bool = False
    ) -> TrainState:
        """Clip ``g_t`` and apply the optimizer: ``s_{t+1}`` (no graph). ``donate``: the caller
        gives up ``state``, whose tensors then receive ``s_{t+1}`` if the optimizer can write
        in place (``update_in_place``; the same bits)."""
        with torch.no_grad():
            if self.clip_norm is not None:
                grad = clip_by_global_norm(grad, self.clip_norm)
            in_place = _in_place_form(self.optimizer) if donate else None
            new_params, new_opt = (in_place or self.optimizer.update)(
                grad, state.params, state.opt_state, step=state.step, lr=inputs.lr.detach(),
                weight_decay=_detached(inputs.weight_decay),
            )
        return TrainState(new_params, tuple(new_opt), new_buffers.detach(), state.step + 1)

    def take_step(
        self, state: TrainState, meta: Mapping[str, Tensor], skip: frozenset[str] = frozenset(), donate: bool = False
    ) -> StepResult:
        """:meth:`step`, also returning the gradient and the per-example losses it used.

        ``skip``: kinds left out, a subset of :meth:`neutral_kinds` (the same bits, less work).
        ``donate``: ``state`` is given up and may be overwritten by the new state (:meth:`update`)."""
        t = state.step
        if t >= self.steps:
            raise IndexError(f"step {t} is past the end of training (T={self.steps})")
        with torch.no_grad():
            inputs = self.step_inputs(t, self.local_meta(meta, t, skip))
        grad, new_buffers, losses = self.gradient(state, inputs)
        return StepResult(self.update(state, grad, inputs, new_buffers, donate), grad, losses)

    def step(self, state: TrainState, meta: Mapping[str, Tensor]) -> TrainState:
        """``s_{t+1} = h_t(s_t, z)``: one training step, no graph kept, inputs untouched."""
        return self.take_step(state, meta).state

    def step_with_grad(self, state: TrainState, meta: Mapping[str, Tensor]) -> tuple[TrainState, Tensor]:
        """:meth:`step`, also returning the minibatch gradient ``g_t`` it used."""
        result = self.take_step(state, meta)
        return result.state, result.grad

    def linearize(self, state: TrainState, local: Mapping[str, Tensor], wrt: Sequence[str]) -> GradGraph:
        """Compute ``g_t`` at ``s_t`` keeping its graph (see :class:`GradGraph`)."""
        t = state.step
        with torch.enable_grad():
            params = state.params.detach().requires_grad_(True)
            buffers = state.buffers.detach().requires_grad_(True)
            leaves = metaparameter_leaves(local, wrt)
            inputs = self.step_inputs(t, leaves)
            grad, new_buffers, losses = self.accumulate_gradient(params, buffers, inputs, t, create_graph=True)
        full_grad = self.sum_over_ranks(grad.detach())
        return GradGraph(t, params, buffers, leaves, inputs, grad, full_grad, new_buffers, losses)

    def next_state(self, state: TrainState, graph: GradGraph) -> TrainState:
        """``s_{t+1}`` from a :class:`GradGraph`: the same arithmetic as :meth:`step`."""
        return self.update(state, graph.full_grad, graph.inputs, graph.new_buffers)

    def differentiable_step(
        self, state_tensors: tuple[Tensor, ...], step: int, local: Mapping[str, Tensor]
    ) -> tuple[Tensor, ...]:
        """One step with a graph through everything: ``h_t`` as a differentiable function of
        state and ``local`` (the full-unroll reference of :mod:`mgd.check`; one process)."""
        params, *opt_state, buffers = state_tensors
        inputs = self.step_inputs(step, local)
        grad, new_buffers, _ = self.accumulate_gradient(params, buffers, inputs, step, create_graph=True)
        if self.clip_norm is not None:
            grad = clip_by_global_norm(grad, self.clip_norm)
        new_params, new_opt = self.optimizer.update(
            grad, params, tuple(opt_state), step=step, lr=inputs.lr, weight_decay=inputs.weight_decay
        )
        return (new_params, *new_opt, new_buffers)

    def run(
        self,
        meta: Mapping[str, Tensor] | None = None,
        *,
        state: TrainState | None = None,
        until: int | None = None,
        callback: Callable[[TrainState], None] | None = None,
    ) -> TrainState:
        """Train from ``state`` (default: the initial state) up to step ``until`` (default T).

        Raises:
            UserError: the training loss became NaN or infinite (the message names the step).
        """
        meta = self.check_meta(meta or {})
        start = state = self.init_state() if state is None else state
        until = self.steps if until is None else until
        sums = []
        skip = self.neutral_kinds(meta)
        # Without a callback (the user's code, which may keep states) nothing sees the states
        # between steps: torch's generators are saved and restored once for the whole loop, and
        # every state this loop made is overwritten by the next, as torch.optim does.
        quiet = callback is None
        with math_attention(), restored_rng(self.device) if quiet else nullcontext():
            while state.step < until:
                result = self.take_step(state, meta, skip, donate=quiet and state is not start)
                sums.append(result.losses.sum())
                state = result.state
                if callback is not None:
                    callback(state)
        self.check_finite(torch.stack(sums) if sums else None, first_step=until - len(sums))
        self.stateless.check_constants()
        return state

    def check_finite(self, loss_sums: Tensor | None, first_step: int = 0) -> None:
        """Raise a :class:`UserError` naming the first step whose loss was NaN or infinite."""
        if loss_sums is None:
            return
        bad = ~torch.isfinite(loss_sums)
        if bool(bad.any()):
            step = first_step + int(bad.nonzero()[0, 0])
            raise UserError(
                f"the training loss is NaN or infinite at step {step}: lower the learning rate, "
                "clip gradients (clip_norm=) or check the data and the loss"
            )

    def init_state(self) -> TrainState:
        params = self.flat_params()
        return TrainState(params, tuple(self.optimizer.init(params)), self.flat_buffers(), 0)

    # ----------------------------------------------------------------------------- the update's VJP
    def update_pullback(
        self,
        state: TrainState,
        grad: Tensor,
        inputs: StepInputs,
        leaves: Mapping[str, Tensor],
        wrt: Sequence[str],
        adjoint: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
        """``(ḡ, ∂U/∂θᵀā, ∂U/∂oᵀā, z̄ through η and λ)``: the VJP of clipping and update alone.

        In closed form when the optimizer has ``update_vjp`` (the built-in ones), else by
        autograd over the update; ``η̄`` and ``λ̄`` are then chained into the metaparameters.
        """
        optimizer = self.optimizer
        grad = grad.detach()
        clipped = grad if self.clip_norm is None else clip_by_global_norm(grad, self.clip_norm)
        n = len(state.opt_state)
        if hasattr(optimizer, "update_vjp"):
            vjp = optimizer.update_vjp(
                clipped, state.params, state.opt_state, adjoint[0], tuple(adjoint[1 : 1 + n]),
                step=state.step, lr=inputs.lr, weight_decay=inputs.weight_decay,
            )
            outputs, seeds = [], []
            for value, bar in ((inputs.lr, vjp.lr), (inputs.weight_decay, vjp.weight_decay)):
                if isinstance(value, Tensor) and value.requires_grad:
                    outputs.append(value)
                    seeds.append(bar)
            local_bar = {name: torch.zeros_like(leaves[name]) for name in wrt}
            if outputs and wrt:
                # retain_graph: a metaparameter's own graph may be walked again (data weights)
                extra = seeded_grad(outputs, [leaves[name] for name in wrt], seeds, allow_unused=True,
                                    retain_graph=True)
                add_into(local_bar, wrt, extra)
            g_bar, theta_bar, moments_bar = vjp.grad, vjp.params, tuple(vjp.state)
        else:
            with torch.enable_grad():
                g = clipped.requires_grad_(True)
                theta = state.params.detach().requires_grad_(True)
                moments = tuple(m.detach().requires_grad_(True) for m in state.opt_state)
                new_params, new_moments = optimizer.update(
                    g, theta, moments, step=state.step, lr=inputs.lr, weight_decay=inputs.weight_decay
                )
                outputs = (new_params, *new_moments)
                targets = (g, theta, *moments, *(leaves[name] for name in wrt))
                # retain_graph: a metaparameter's own graph (e.g. lr knots) may be walked again
                grads = zeros_for_none(
                    seeded_grad(outputs, targets, adjoint[: len(outputs)], allow_unused=True, retain_graph=True),
                    targets,
                )
            g_bar, theta_bar, moments_bar = grads[0], grads[1], tuple(grads[2 : 2 + n])
            local_bar = dict(zip(wrt, grads[2 + n :]))
        if self.clip_norm is not None:
            g_bar = clip_vjp(grad, g_bar, self.clip_norm)
        return g_bar, theta_bar, moments_bar, local_bar


def _in_place_form(optimizer: Any) -> Callable | None:
    """``optimizer.update_in_place`` if the class that defines its ``update`` defines it too, else
    ``None``: a subclass or wrapper with its own ``update`` must never be bypassed."""
    for klass in type(optimizer).__mro__:
        if "update" in vars(klass):
            return optimizer.update_in_place if "update_in_place" in vars(klass) else None
    return None


_NO_DOUBLE_BACKWARD = (
    "metagradients differentiate each step twice: use a differentiable implementation (for "
    "attention: the math backend, or attn_implementation='eager' in transformers)"
)


def once_differentiable_function(loss: Tensor) -> str | None:
    """The name of a custom ``autograd.Function`` in ``loss``'s graph whose backward is
    ``@once_differentiable`` (its gradient carries no graph: a second derivative through it
    would silently be zero), or ``None``."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        forward_cls = getattr(node, "_forward_cls", None)
        code = getattr(getattr(forward_cls, "backward", None), "__code__", None)
        if code is not None and "once_differentiable" in getattr(code, "co_qualname", code.co_name):
            return forward_cls.__name__
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return None


def seeded_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], seeds: Sequence[Tensor], **options):
    r"""``torch.autograd.grad(outputs, inputs, seeds, **options)``, computed as the gradient of
    the scalar :math:`\sum_k \langle o_k, s_k \rangle`.

    The numbers are the same bit for bit: the scalar's backward hands output ``k`` exactly
    ``1 · s_k`` (``dot``'s and ``add``'s derivatives). Passing ``grad_outputs`` instead makes
    torch (``autograd._make_grads``) import ``torch.fx.experimental.symbolic_shapes`` and sympy
    the first time, 30 MB of resident memory that a metagradient pass does not otherwise need.
    """
    total = None
    for output, seed in zip(outputs, seeds):
        term = torch.dot(output.reshape(-1), seed.reshape(-1))
        total = term if total is None else total + term
    return torch.autograd.grad(total, inputs, **options)


def second_backward(outputs, inputs, grad_outputs, **options):
    """:func:`seeded_grad` through a recorded gradient, with a clear error for operations
    whose backward has no derivative (fused attention kernels, ...)."""
    try:
        if grad_outputs is None:
            return torch.autograd.grad(outputs, inputs, **options)
        return seeded_grad(outputs, inputs, grad_outputs, **options)
    except RuntimeError as error:
        text = str(error)
        if ("derivative for" in text and "not implemented" in text) or "differentiate twice" in text:
            raise UserError(f"an operation in the model has no double backward ({text.splitlines()[0]}); "
                            + _NO_DOUBLE_BACKWARD) from None
        raise


_CHECKED_GRAPHS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def second_order_grad(loss: Tensor, params: Tensor, model: nn.Module | None = None) -> tuple[Tensor, ...]:
    """``∇ loss`` with ``create_graph=True``, refusing graphs a second backward cannot walk
    (the graph is inspected once per ``model``)."""
    if model is None or model not in _CHECKED_GRAPHS:
        blocker = once_differentiable_function(loss)
        if blocker is not None:
            raise UserError(
                f"the autograd.Function {blocker} in the model has no double backward (it is "
                "@once_differentiable); " + _NO_DOUBLE_BACKWARD
            )
        if model is not None:
            _CHECKED_GRAPHS.add(model)
    return second_backward(loss, params, None, create_graph=True)


def _detached(value):
    return value.detach() if isinstance(value, Tensor) else value


def metaparameter_leaves(local: Mapping[str, Tensor], wrt: Sequence[str]) -> dict[str, Tensor]:
    """Detached metaparameter slices; those in ``wrt`` are leaves that require grad."""
    return {
        name: (value.detach().requires_grad_(True) if name in wrt else value.detach())
        for name, value in local.items()
    }


def add_into(total: dict[str, Tensor], wrt: Sequence[str], extra: Sequence[Tensor | None]) -> None:
    """``total[name] += e`` for each name of ``wrt`` whose ``e`` is not ``None``."""
    for name, e in zip(wrt, extra):
        if e is not None:
            total[name] = total[name] + e


def zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, like))


def make_run(model: nn.Module, **kwargs) -> TrainingRun:
    """Build a :class:`TrainingRun` (keyword arguments as there): ``make_run(model, optimizer=...,
    data=..., steps=..., batch_size=..., lr=..., loss=..., ...)``."""
    try:
        optimizer, data = kwargs.pop("optimizer"), kwargs.pop("data")
    except KeyError as missing:
        raise UserError(f"make_run needs {missing.args[0]}=") from None
    return TrainingRun(model, optimizer, data, **kwargs)
