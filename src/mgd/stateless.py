r"""Running a user's ``nn.Module`` as a pure function of explicit tensors.

The training state holds the *trainable* parameters as one flat vector (and BatchNorm running
statistics as one flat vector of buffers); everything else about the module is constant.
:class:`StatelessModel` partitions a module accordingly and runs a private copy of it at given
tensors, like ``torch.func.functional_call`` but cheaper per call:

* **trainable** parameters (``requires_grad=True``, or those a user's filter selects) are
  removed from the copy; each call writes views of the flat vector straight into the owning
  submodules' ``__dict__``, where ordinary attribute lookup finds them first. A parameter that
  appears under two names (tied input/output embeddings) is one slot of the vector, so its
  gradient is the sum over both uses, as in ``torch.optim``.
* **frozen** parameters become constant tensors of the copy (sharing storage with the user's
  module: a LoRA base costs no memory twice) and are never part of a checkpoint.
* **BatchNorm running statistics** are state (NOTE [buffers]).
* every **other buffer** is a constant (an input-normalisation mean, a causal mask); a module
  that writes one in place during training is refused (:meth:`StatelessModel.check_constants`).

The copy is made once; hooks registered on the user's module afterwards do not run. The
user's module is never modified.

NOTE [buffers]: BatchNorm in train mode normalises with batch statistics and updates its
running statistics in place, outside autograd. Those statistics are what an eval-mode
objective reads, so they must be differentiable functions of the parameters. Each training
call hands BatchNorm throwaway copies of the buffers (nothing stored is ever mutated), records
each BatchNorm layer's input with a forward pre-hook, and recomputes the new running
statistics out of place with PyTorch's formula ``r' = (1 - m) r + m · stat`` (unbiased
variance; ``m = 1 / count`` when ``momentum`` is ``None``). ``num_batches_tracked`` is not
state: it is its initial value plus the number of calls so far (the step count, times the
number of micro-batches). In eval mode PyTorch's kernel cannot differentiate with respect to
the running statistics, so a forward hook recomputes each BatchNorm output as
``(x - mean) / sqrt(var + eps) · weight + bias`` from the differentiable ones.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mgd.errors import UserError

__all__ = ["StatelessModel", "Trainable"]

#: ``(name, parameter) -> bool``: which parameters are trained (default: ``requires_grad``).
Trainable = Callable[[str, nn.Parameter], bool]

_EXACT_DTYPES = (torch.float32, torch.float64)


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class StatelessModel:
    """A private, partitioned copy of ``model`` that runs at explicitly given tensors.

    Args:
        model: the user's module; its current parameters and buffers are the initial ones.
        trainable: which parameters are trained (default: those with ``requires_grad``).

    Raises:
        UserError: no trainable parameter, parameters in half precision or of mixed dtypes
            or devices.
    """

    def __init__(self, model: nn.Module, trainable: Trainable | None = None):
        if not isinstance(model, nn.Module):
            raise UserError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
        select = trainable or (lambda name, p: p.requires_grad)
        named = list(model.named_parameters())  # each tensor once, under its first name
        chosen = [(n, p) for n, p in named if select(n, p)]
        if not chosen:
            raise UserError(
                "no parameter is trainable: every parameter has requires_grad=False or the "
                "trainable filter selects nothing; unfreeze at least one parameter"
            )
        dtypes = {p.dtype for _, p in named} | {b.dtype for b in model.buffers() if b.is_floating_point()}
        odd = sorted(str(d) for d in dtypes if d.is_floating_point and d not in _EXACT_DTYPES)
        if odd:
            raise UserError(
                f"the model has {', '.join(odd)} tensors; exact metagradients need float32 or "
                "float64: convert the model with model.float() (or .double())"
            )
        if len({p.dtype for _, p in chosen}) > 1 or len({p.device for _, p in named}) > 1:
            raise UserError(
                "the model's parameters must share one dtype and one device; call "
                "model.to(dtype=..., device=...) first"
            )
        self.names = tuple(n for n, _ in chosen)
        self.shapes = tuple(p.shape for _, p in chosen)
        self.numels = tuple(p.numel() for _, p in chosen)
        self.dtype = chosen[0][1].dtype
        self.device = chosen[0][1].device
        trained = {id(p) for _, p in chosen}
        self.frozen_names = tuple(n for n, p in named if id(p) not in trained)
        self._initial = [p.detach() for _, p in chosen]

        norms = [(n, m) for n, m in model.named_modules() if _is_batchnorm(m)]
        self.norms = tuple(n for n, _ in norms)
        self.buffer_names = tuple(
            f"{n}.{stat}" if n else stat for n, _ in norms for stat in ("running_mean", "running_var")
        )
        self.buffer_shapes = tuple(model.get_buffer(n).shape for n in self.buffer_names)
        self.buffer_numels = tuple(s.numel() for s in self.buffer_shapes)
        self._initial_buffers = [model.get_buffer(n).detach() for n in self.buffer_names]
        self._initial_tracked = [
            None if m.num_batches_tracked is None else int(m.num_batches_tracked) for _, m in norms
        ]

        # The copy shares every parameter's storage with the user's module (memo), and clones
        # the buffers (so that a module writing a buffer in place never reaches the user's).
        memo = {id(p): p for p in model.parameters()}
        self.module = copy.deepcopy(model, memo)
        index = {n: i for i, n in enumerate(self.names)}
        canonical = {id(p): n for n, p in named}
        originals = dict(model.named_parameters(remove_duplicate=False))
        self._slots: list[tuple[nn.Module, str, int]] = []
        for full_name, p in originals.items():
            owner_name, _, attr = full_name.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            owner._parameters.pop(attr, None)
            name = canonical[id(p)]
            if name in index:
                self._slots.append((owner, attr, index[name]))
            else:  # frozen: a constant attribute of the copy, forever
                owner.__dict__[attr] = p.detach()
        self._norm_modules = [self.module.get_submodule(n) for n in self.norms]
        self._norm_index = {id(m): i for i, m in enumerate(self._norm_modules)}
        for module in self._norm_modules:
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                module._buffers.pop(stat, None)
            module.register_forward_pre_hook(self._capture_input)
            module.register_forward_hook(self._eval_output)
        self._constants = [
            (n, b) for n, b in self.module.named_buffers()
        ]
        self._versions = [b._version for _, b in self._constants]
        self._captured: list | None = None
        self._eval_stats: dict[int, tuple[Tensor, Tensor]] | None = None
        self._train_mode: bool | None = None

    # ------------------------------------------------------------------ sizes and views
    @property
    def num_params(self) -> int:
        return sum(self.numels)

    @property
    def has_buffers(self) -> bool:
        """Whether BatchNorm running statistics are part of the state."""
        return bool(self.buffer_names)

    def initial_params(self) -> Tensor:
        """The trainable parameters of the user's module as one flat vector (``θ_0``)."""
        return torch.cat([p.reshape(-1) for p in self._initial])  # cat copies: no alias of the module

    def initial_buffers(self) -> Tensor:
        """The BatchNorm running statistics as one flat vector (empty without BatchNorm)."""
        if not self._initial_buffers:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat([b.reshape(-1) for b in self._initial_buffers]).to(self.dtype)

    def unflatten(self, params: Tensor) -> dict[str, Tensor]:
        """Views of the flat trainable vector shaped like the parameters, keyed by name."""
        return {n: c.view(s) for n, c, s in zip(self.names, params.split(self.numels), self.shapes)}

    def named_tensors(self, params: Tensor, buffers: Tensor) -> dict[str, Tensor]:
        """Trainable parameters and BatchNorm statistics by name (what objectives receive)."""
        named = self.unflatten(params)
        chunks = buffers.split(self.buffer_numels) if self.buffer_numels else ()
        named.update({n: c.view(s) for n, c, s in zip(self.buffer_names, chunks, self.buffer_shapes)})
        return named

    def frozen_tensors(self) -> dict[str, Tensor]:
        """The constant (frozen) parameters by name."""
        out = {}
        for name in self.frozen_names:
            owner_name, _, attr = name.rpartition(".")
            out[name] = self.module.get_submodule(owner_name).__dict__[attr]
        return out

    # ------------------------------------------------------------------ calls
    def _set_mode(self, train: bool) -> None:
        if self._train_mode is not train:
            self.module.train(train)
            self._train_mode = train

    def _bind(self, values: Sequence[Tensor]) -> None:
        for owner, attr, i in self._slots:
            owner.__dict__[attr] = values[i]

    def _unbind(self) -> None:
        for owner, attr, _ in self._slots:  # hold no reference to the caller's tensors
            owner.__dict__.pop(attr, None)
        for module in self._norm_modules:
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                module.__dict__.pop(stat, None)

    def _values(self, params: Tensor | Mapping[str, Tensor]) -> list[Tensor]:
        if isinstance(params, Mapping):
            return [params[n] for n in self.names]
        return [c.view(s) for c, s in zip(params.split(self.numels), self.shapes)]

    def train_call(
        self, params: Tensor, buffers: Tensor, args: tuple, kwargs: Mapping[str, Any], calls: int = 0
    ) -> tuple[Any, Tensor]:
        """``model(*args, **kwargs)`` in train mode at flat ``params`` and ``buffers``.

        Returns the output and the new flat BatchNorm statistics (differentiable in
        ``params`` and ``buffers``; ``buffers`` itself without BatchNorm). ``calls``: how many
        training calls came before (for ``num_batches_tracked``).
        """
        self._set_mode(True)
        self._bind(self._values(params))
        if not self.buffer_names:
            try:
                return self.module(*args, **kwargs), buffers
            finally:
                self._unbind()
        stats = dict(zip(self.buffer_names, buffers.split(self.buffer_numels)))
        for name, module, tracked in zip(self.norms, self._norm_modules, self._initial_tracked):
            prefix = f"{name}." if name else ""
            for stat, shape in (("running_mean", module.num_features), ("running_var", module.num_features)):
                # a throwaway copy: BatchNorm's in-place update must never reach a stored state
                module.__dict__[stat] = stats[prefix + stat].detach().clone().view(shape)
            module.__dict__["num_batches_tracked"] = (
                None if tracked is None else torch.tensor(tracked + calls, device=self.device)
            )
        self._captured = []
        try:
            out = self.module(*args, **kwargs)
            captured = self._captured
        finally:
            self._captured = None
            self._unbind()
        if len(captured) != len(self._norm_modules):
            raise UserError(
                "each BatchNorm layer must run exactly once per forward pass to carry its "
                "running statistics"
            )
        updated = dict(stats)
        for module, inputs in captured:
            i = self._norm_index[id(module)]
            prefix = f"{self.norms[i]}." if self.norms[i] else ""
            dims = [d for d in range(inputs.dim()) if d != 1]
            count = inputs.numel() // inputs.shape[1]
            centred_mean = inputs.mean(dim=dims, keepdim=True)
            mean = centred_mean.view(-1)
            # two passes by hand: 3-8x faster than Tensor.var's kernel on the CPU, same maths
            var = (
                (inputs - centred_mean).square().sum(dim=dims) / (count - 1)
                if count > 1 else torch.zeros_like(mean)
            )
            if module.momentum is None:  # cumulative average over all batches so far
                factor = 1.0 / (self._initial_tracked[i] + calls + 1)
            else:
                factor = module.momentum
            for stat, value in (("running_mean", mean), ("running_var", var)):
                key = prefix + stat
                updated[key] = (1.0 - factor) * stats[key] + factor * value
        return out, torch.cat([updated[n].reshape(-1) for n in self.buffer_names])

    def eval_call(
        self, params: Tensor | Mapping[str, Tensor], buffers: Tensor | Mapping[str, Tensor] | None,
        args: tuple, kwargs: Mapping[str, Any],
    ) -> Any:
        """``model(*args, **kwargs)`` in eval mode, differentiable in ``params`` and ``buffers``.

        ``params``/``buffers`` are flat vectors or name → tensor dicts (as objectives get them).
        """
        self._set_mode(False)
        self._bind(self._values(params))
        if self.buffer_names:
            if isinstance(buffers, Mapping):
                stats = {n: buffers[n] for n in self.buffer_names}
            else:
                stats = dict(zip(self.buffer_names, buffers.split(self.buffer_numels)))
            self._eval_stats = {}
            for name, module in zip(self.norms, self._norm_modules):
                prefix = f"{name}." if name else ""
                mean, var = stats[prefix + "running_mean"], stats[prefix + "running_var"]
                module.__dict__["running_mean"] = mean.detach().view(-1)
                module.__dict__["running_var"] = var.detach().view(-1)
                module.__dict__["num_batches_tracked"] = None
                self._eval_stats[id(module)] = (mean.view(-1), var.view(-1))
        try:
            return self.module(*args, **kwargs)
        finally:
            self._eval_stats = None
            self._unbind()

    def _capture_input(self, module: nn.Module, args: tuple) -> None:
        if self._captured is not None and module.training:
            self._captured.append((module, args[0]))

    def _eval_output(self, module: nn.Module, args: tuple, output: Tensor):
        if self._eval_stats is None or module.training:
            return None
        mean, var = self._eval_stats[id(module)]
        inputs = args[0]
        shape = [1, -1] + [1] * (inputs.dim() - 2)
        out = (inputs - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
        if module.affine:
            out = out * module.weight.view(shape) + module.bias.view(shape)
        return out

    def check_constants(self) -> None:
        """Refuse a module that wrote one of its constant buffers in place.

        Only BatchNorm running statistics are carried as state; any other buffer changed
        during a step would make the replayed steps differ from the original ones.
        """
        for (name, buffer), version in zip(self._constants, self._versions):
            if buffer._version != version:
                raise UserError(
                    f"the model changed its buffer {name!r} in place during training; mgd "
                    "carries only BatchNorm running statistics as state and treats every other "
                    "buffer as a constant: compute that value out of place, or make it a parameter"
                )
