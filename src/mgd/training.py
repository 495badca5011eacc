"""The functional training core: a pure, deterministic step over an explicit state.

Training is ``s_{t+1} = h_t(s_t, z)`` for ``t = 0 .. T-1`` (``method.md`` §1). Here

* the state :class:`TrainState` holds the flat parameter vector, the optimizer's tensors, the
  module's buffers (BatchNorm running statistics, flat) and the step count: everything step
  ``t`` reads;
* ``z`` is a mapping from metaparameter names to tensors (:mod:`mgd.metaparams`);
* the minibatch of step ``t`` is a pure function of ``(seed, t)`` (:meth:`Trainer.batch_indices`),
  so a replayed step reproduces the original bit for bit.

The model is any ``nn.Module`` whose only buffers are BatchNorm running statistics, run on
views of the flat parameter vector (a private stateless copy of the module, or
``torch.func.functional_call`` for BatchNorm models). Keeping the parameters (and every
optimizer moment) as one flat tensor makes the optimizer a handful of vector operations and
a checkpoint a few ``clone`` calls.

NOTE [buffers]: BatchNorm in train mode normalises with batch statistics and updates its
running statistics in place, outside autograd. The running statistics are what an eval-mode
objective reads, so they must be differentiable functions of the parameters. The trainer
therefore hands BatchNorm throwaway copies of the buffers (so nothing stored is ever
mutated), records each BatchNorm layer's input with a forward pre-hook, and recomputes the new
running statistics out of place with PyTorch's formula
``r' = (1 - m) r + m · stat`` (unbiased variance; ``m = 1 / count`` when ``momentum`` is
``None``). ``num_batches_tracked`` is not state: it is its initial value plus the step count.

NOTE [determinism]: every step is a deterministic function of its inputs on a fixed device,
dtype and thread count. ``mgd`` never reads a global RNG during training; the CLI fixes the
thread count. The REPLAY engine fingerprints every state and refuses a replay that diverged.
"""

from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.errors import UserError
from mgd.metaparams import MetaParam, StepInputs, resolve_metaparams
from mgd.optim import Optimizer

__all__ = ["TrainState", "Trainer", "cross_entropy_objective", "accuracy"]


@dataclass(frozen=True)
class TrainState:
    """Everything step ``step`` reads.

    Attributes:
        params: the flat parameter vector.
        opt_state: the optimizer's tensors (flat, like ``params``).
        buffers: the flat floating-point buffers (BatchNorm running statistics); empty when
            the model has none.
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


@contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode for a block, restoring the previous mode."""
    previous = model.training
    if previous != train:
        model.train(train)
    try:
        yield
    finally:
        if previous != train:
            model.train(previous)


def eval_forward(model: nn.Module, named: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` in eval mode at parameters and buffers ``named``, differentiable in both.

    PyTorch's eval-mode BatchNorm kernel cannot differentiate with respect to the running
    statistics, yet an eval-mode objective depends on them. Each BatchNorm layer therefore gets
    the detached statistics (for the kernel, whose output is discarded) and a forward hook
    that recomputes its output as ``(x - mean) / sqrt(var + eps) · weight + bias`` from the
    differentiable ones.
    """
    norms = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    if not norms:
        if _has_shared_submodules(model):
            # torch 2.13's functional_call leaves such a module holding plain tensors.
            return _eval_copy(model).call_named(named, x)
        with _mode(model, False):
            return functional_call(model, dict(named), (x,))
    detached = dict(named)
    handles = []
    for name, module in norms:
        prefix = f"{name}." if name else ""
        mean, var = named[prefix + "running_mean"], named[prefix + "running_var"]
        detached[prefix + "running_mean"], detached[prefix + "running_var"] = mean.detach(), var.detach()

        def hook(module: nn.Module, args: tuple, output: Tensor, mean=mean, var=var) -> Tensor:
            inputs = args[0]
            shape = [1, -1] + [1] * (inputs.dim() - 2)
            out = (inputs - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
            if module.affine:
                out = out * module.weight.view(shape) + module.bias.view(shape)
            return out

        handles.append(module.register_forward_hook(hook))
    try:
        with _mode(model, False):
            return functional_call(model, detached, (x,))
    finally:
        for handle in handles:
            handle.remove()


class _StatelessModule:
    """A private copy of a buffer-free model whose parameters are plain attributes.

    ``functional_call`` swaps every parameter in and out of the module on each call, which
    costs about as much as the optimizer step on small models. Here the copy's parameters are
    removed once and each call writes the views of the flat vector straight into the
    submodules' ``__dict__`` (where ordinary attribute lookup finds them first), then runs
    the copy in train (or eval) mode. Tied parameters get the same view. The user's module is
    never touched. The arithmetic is that of ``functional_call`` (the tests compare them bit
    for bit).

    The training copy is made at the first training step: forward hooks registered on the
    model after that do not run during training. Evaluation (objectives,
    :meth:`Trainer.predict`) runs the user's module itself, hooks included, except for models
    with a shared submodule, which torch 2.13's ``functional_call`` would damage: they are
    evaluated on an eval-mode copy.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...], train: bool = True) -> None:
        self.module = copy.deepcopy(model).train(train)
        self.names = names
        index = {name: i for i, name in enumerate(names)}
        canonical = {id(p): index[name] for name, p in model.named_parameters()}
        originals = dict(model.named_parameters(remove_duplicate=False))
        self.slots: list[tuple[nn.Module, str, int]] = []
        for full_name, _ in self.module.named_parameters(remove_duplicate=False):
            owner_name, _, attr = full_name.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            self.slots.append((owner, attr, canonical[id(originals[full_name])]))
        for owner, attr, _ in self.slots:
            owner._parameters.pop(attr, None)

    def __call__(self, chunks: tuple[Tensor, ...], shapes: tuple[torch.Size, ...], x: Tensor) -> Tensor:
        """Run at parameters given as flat chunks (in ``named_parameters`` order) and shapes."""
        return self._run([chunk.view(shape) for chunk, shape in zip(chunks, shapes)], x)

    def call_named(self, named: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Run at parameters given by name, as ``functional_call`` takes them."""
        return self._run([named[name] for name in self.names], x)

    def _run(self, values: list[Tensor], x: Tensor) -> Tensor:
        for owner, attr, i in self.slots:
            owner.__dict__[attr] = values[i]
        try:
            return self.module(x)
        finally:
            for owner, attr, _ in self.slots:  # hold no reference to the caller's tensors
                owner.__dict__.pop(attr, None)


def _has_shared_submodules(model: nn.Module) -> bool:
    """Whether one submodule object appears under two names (``nn.Sequential(a, b, a)``)."""
    every = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    return len(every) != len(set(every))


#: Eval-mode stateless copies of models with shared submodules, made on first use.
_EVAL_COPIES: "weakref.WeakKeyDictionary[nn.Module, _StatelessModule]" = weakref.WeakKeyDictionary()


def _eval_copy(model: nn.Module) -> "_StatelessModule":
    if model not in _EVAL_COPIES:
        _EVAL_COPIES[model] = _StatelessModule(model, tuple(n for n, _ in model.named_parameters()), train=False)
    return _EVAL_COPIES[model]


@dataclass
class Trainer:
    """A training run as a pure step function.

    Args:
        model: an ``nn.Module`` whose only buffers are BatchNorm running statistics; its
            current parameters and buffers are the initial ones. Training runs it in train
            mode (a buffer-free model through a private copy made at the first step, so
            hooks added later do not run in training); objectives built with
            :func:`cross_entropy_objective` run it in eval mode.
        optimizer: an :mod:`mgd.optim` optimizer.
        x_train, y_train: the training set (features, integer labels), on the training device.
        steps: number of optimizer steps ``T``.
        batch_size: examples per step; each epoch is a fresh permutation and the last
            incomplete batch of an epoch is dropped.
        lr: base learning rate; the ``lr`` and ``lr_knots`` metaparameters multiply it.
        weight_decay: default weight decay (the ``weight_decay`` metaparameter replaces it).
        seed: seeds the batch order.
        warmup_steps: linear learning-rate warm-up: step ``t`` uses
            ``lr · min(1, (t + 1) / warmup_steps)`` before any metaparameter acts.
        metaparams: the kinds of metaparameters this run has (names from
            :data:`mgd.metaparams.METAPARAMS`, or instances). Their values are passed to
            :meth:`step`; a missing value means the kind's neutral default.
        collective: data parallelism (:mod:`mgd.distributed`): this process computes its
            shard of every minibatch and gradients are summed over ranks. Default: one process.

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
    warmup_steps: int = 0
    collective: Collective = SINGLE_PROCESS
    _names: tuple[str, ...] = field(init=False, repr=False)
    _shapes: tuple[torch.Size, ...] = field(init=False, repr=False)
    _numels: tuple[int, ...] = field(init=False, repr=False)
    _norms: tuple[tuple[str, nn.modules.batchnorm._BatchNorm], ...] = field(init=False, repr=False)
    _buffer_names: tuple[str, ...] = field(init=False, repr=False)
    _buffer_shapes: tuple[torch.Size, ...] = field(init=False, repr=False)
    _buffer_numels: tuple[int, ...] = field(init=False, repr=False)
    _captured: list | None = field(init=False, repr=False, default=None)
    _epoch_cache: dict = field(init=False, repr=False, default_factory=dict)
    _stateless: "_StatelessModule | None" = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._setup_buffers()
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
        if self.warmup_steps < 0:
            raise UserError(f"warm-up steps must be >= 0, got {self.warmup_steps}")
        if self.collective.world_size > 1:
            if self._norms:
                raise UserError(
                    "BatchNorm is not supported with more than one process (its batch statistics "
                    "would need synchronising); use --norm none or one process"
                )
            if self.batch_size < self.collective.world_size:
                raise UserError(
                    f"batch size {self.batch_size} is smaller than the {self.collective.world_size} "
                    "processes: every rank needs at least one example per step"
                )
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
    def has_buffers(self) -> bool:
        """Whether the model carries BatchNorm running statistics in the state."""
        return bool(self._norms)

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

    def named_tensors(self, params: Tensor, buffers: Tensor) -> dict[str, Tensor]:
        """Parameters and floating-point buffers as a name → tensor dict (what objectives get)."""
        named = self.unflatten(params)
        chunks = buffers.split(self._buffer_numels)
        named.update(
            {name: c.view(shape) for name, c, shape in zip(self._buffer_names, chunks, self._buffer_shapes)}
        )
        return named

    def predict(self, params: Tensor, buffers: Tensor, x: Tensor) -> Tensor:
        """The model's output in eval mode (BatchNorm uses the running statistics)."""
        return eval_forward(self.model, self.named_tensors(params, buffers), x)

    # ----------------------------------------------------------------------------- buffers
    def _setup_buffers(self) -> None:
        norms = []
        for name, module in self.model.named_modules():
            own = [b for b, _ in module.named_buffers(recurse=False)]
            if not own:
                continue
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UserError(
                    f"module {name!r} ({type(module).__name__}) has buffers; the training core "
                    "carries only BatchNorm running statistics as buffers"
                )
            norms.append((name, module))
        self._norms = tuple(norms)
        floating = [
            (name, b) for name, b in self.model.named_buffers() if b.is_floating_point()
        ]
        self._buffer_names = tuple(name for name, _ in floating)
        self._buffer_shapes = tuple(b.shape for _, b in floating)
        self._buffer_numels = tuple(b.numel() for _, b in floating)
        for _, module in self._norms:
            module.register_forward_pre_hook(self._capture_input)

    def _capture_input(self, module: nn.Module, args: tuple) -> None:
        if self._captured is not None and module.training:
            self._captured.append((module, args[0]))

    def flat_buffers(self) -> Tensor:
        """The model's current floating-point buffers as one flat vector (may be empty)."""
        values = [b.detach().reshape(-1) for name, b in self.model.named_buffers() if b.is_floating_point()]
        if not values:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(values).to(device=self.device, dtype=self.dtype)

    def _train_forward(self, params: Tensor, buffers: Tensor, x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Train-mode output and the new flat buffers (NOTE [buffers]); differentiable."""
        if not self._norms:
            if self._stateless is None:
                self._stateless = _StatelessModule(self.model, self._names)
            return self._stateless(params.split(self._numels), self._shapes, x), buffers
        named = self.unflatten(params)
        # Throwaway copies: BatchNorm's in-place running-stat update must never reach a
        # stored state.
        stored = self.named_tensors(params.detach(), buffers.detach())
        named.update({name: stored[name].clone() for name in self._buffer_names})
        for name, module in self._norms:  # the step counter, also a throwaway
            if module.num_batches_tracked is not None:
                prefix = f"{name}." if name else ""
                named[prefix + "num_batches_tracked"] = module.num_batches_tracked + step
        self._captured = []
        try:
            with _mode(self.model, True):
                out = functional_call(self.model, named, (x,))
            captured = self._captured
        finally:
            self._captured = None
        if len(captured) != len(self._norms):
            raise UserError(
                "each BatchNorm layer must run exactly once per forward pass to carry its "
                "running statistics"
            )
        running = self.named_tensors(params, buffers)  # differentiable views of the old stats
        updated = dict(running)
        module_names = {id(m): name for name, m in self._norms}
        for module, inputs in captured:
            prefix = module_names[id(module)]
            prefix = f"{prefix}." if prefix else ""
            dims = [d for d in range(inputs.dim()) if d != 1]
            count = inputs.numel() // inputs.shape[1]
            mean = inputs.mean(dim=dims)
            var = inputs.var(dim=dims, unbiased=True) if count > 1 else torch.zeros_like(mean)
            if module.momentum is None:  # cumulative average over all batches so far
                tracked = int(module.num_batches_tracked) + step + 1
                factor = 1.0 / tracked
            else:
                factor = module.momentum
            for stat, value in (("running_mean", mean), ("running_var", var)):
                key = prefix + stat
                updated[key] = (1.0 - factor) * running[key] + factor * value
        flat = torch.cat([updated[name].reshape(-1) for name in self._buffer_names])
        return out, flat

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
        return TrainState(params, tuple(self.optimizer.init(params)), self.flat_buffers(), 0)

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

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """``Σ_r tensor_r`` over the data-parallel ranks (``tensor`` itself with one process)."""
        return tensor if self.collective.world_size == 1 else self.collective.all_reduce_sum(tensor)

    def shard_indices(self, step: int) -> Tensor:
        """This rank's part of the minibatch of ``step``: positions ``rank, rank + W, ...``.

        A pure function of ``(seed, step, world size)``; the whole batch with one process.
        """
        index = self.batch_indices(step)
        world = self.collective.world_size
        return index if world == 1 else index[self.collective.rank :: world]

    def step_inputs(self, step: int, local: Mapping[str, Tensor]) -> StepInputs:
        """What step ``step`` consumes, after every metaparameter has acted on it.

        ``local`` holds each metaparameter's slice for this step (:meth:`MetaParam.local`).
        """
        index = self.shard_indices(step)
        lr = self.lr
        if self.warmup_steps:
            lr = lr * min(1.0, (step + 1) / self.warmup_steps)
        inputs = StepInputs(
            index=index,
            x=self.x_train[index],
            y=self.y_train[index],
            example_weights=None,
            lr=torch.tensor(lr, dtype=self.dtype, device=self.device),
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
        )
        for name, mp in self.metaparams.items():
            inputs = mp.apply(local[name], inputs, step, self)
        return inputs

    def local_meta(self, meta: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        index = self.shard_indices(step)
        return {name: mp.local(meta[name], step, index) for name, mp in self.metaparams.items()}

    def example_losses(
        self, params: Tensor, buffers: Tensor, inputs: StepInputs, step: int
    ) -> tuple[Tensor, Tensor]:
        """Unweighted per-example losses ``CE_i`` of the minibatch (train mode), new buffers."""
        logits, new_buffers = self._train_forward(params, buffers, inputs.x, step)
        return F.cross_entropy(logits, inputs.y, reduction="none"), new_buffers

    @staticmethod
    def weighted_mean(losses: Tensor, inputs: StepInputs) -> Tensor:
        """``(1/B) Σ_i w_i ℓ_i`` over this rank's examples (``w_i = 1`` without data weights)."""
        if inputs.example_weights is not None:
            losses = inputs.example_weights * losses
        return losses.sum() / (inputs.batch_size or len(losses))

    def batch_loss(
        self, params: Tensor, buffers: Tensor, inputs: StepInputs, step: int
    ) -> tuple[Tensor, Tensor]:
        """Minibatch loss ``(1/B) Σ_i w_i CE_i`` (``w_i = 1`` without data weights), new buffers."""
        losses, new_buffers = self.example_losses(params, buffers, inputs, step)
        return self.weighted_mean(losses, inputs), new_buffers

    def differentiable_step(
        self, state_tensors: tuple[Tensor, ...], step: int, local: Mapping[str, Tensor]
    ) -> tuple[Tensor, ...]:
        """One step with a graph: ``h_t`` as a differentiable function of state and ``local``.

        ``state_tensors`` is :meth:`TrainState.tensors`. The inner gradient is taken with
        ``create_graph=True`` so the result can be differentiated again (the double-backward
        per-step VJP of ``method.md`` §3.1).
        """
        params, *opt_state, buffers = state_tensors
        inputs = self.step_inputs(step, local)
        loss, new_buffers = self.batch_loss(params, buffers, inputs, step)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        new_params, new_opt = self.optimizer.update(
            grad, params, tuple(opt_state), step=step, lr=inputs.lr, weight_decay=inputs.weight_decay
        )
        return (new_params, *new_opt, new_buffers)

    def step(self, state: TrainState, meta: Mapping[str, Tensor]) -> TrainState:
        """``s_{t+1} = h_t(s_t, z)``: one training step, no graph kept, inputs untouched."""
        return self.step_with_grad(state, meta)[0]

    def step_with_grad(self, state: TrainState, meta: Mapping[str, Tensor]) -> tuple[TrainState, Tensor]:
        """:meth:`step`, also returning the minibatch gradient ``g_t`` it used.

        The mixed-mode VJP of step ``t`` needs ``g_t`` before its Hessian-vector product; a
        replay that already computed it hands it over instead of recomputing it.
        """
        t = state.step
        if t >= self.steps:
            raise IndexError(f"step {t} is past the end of training (T={self.steps})")
        with torch.no_grad():
            inputs = self.step_inputs(t, self.local_meta(meta, t))
        params = state.params.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, new_buffers = self.batch_loss(params, state.buffers, inputs, t)
            (grad,) = torch.autograd.grad(loss, params)
        grad = self.sum_over_ranks(grad)
        with torch.no_grad():
            new_params, new_opt = self.optimizer.update(
                grad, state.params, state.opt_state, step=t, lr=inputs.lr,
                weight_decay=inputs.weight_decay,
            )
        return TrainState(new_params, tuple(new_opt), new_buffers.detach(), t + 1), grad

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
    """``φ(θ)``: mean cross-entropy of ``model`` (eval mode) with parameters and buffers ``θ``.

    ``θ`` is a name → tensor dict, as :meth:`Trainer.named_tensors` returns.
    """

    def objective(params: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(eval_forward(model, params, x), y)

    return objective


@torch.no_grad()
def accuracy(trainer: Trainer, state: TrainState, x: Tensor, y: Tensor) -> float:
    """Fraction of ``(x, y)`` classified correctly at ``state`` (eval mode; not differentiated)."""
    return (trainer.predict(state.params, state.buffers, x).argmax(dim=1) == y).double().mean().item()
