"""Peer libraries' metagradients on the benchmark problem, for ``bench_grad.py``.

Each adapter is ``fn(trainer, objective) -> (value, grads)``, the same shape as
:func:`mgd.check.full_unroll_metagradient`, so the benchmark times and checks it like any other
method. Every adapter reproduces the run that ``trainer`` describes as closely as its library
allows:

* the initial parameters are a copy of ``trainer.model``'s (the trainer never writes to them);
* step ``t`` uses the minibatch ``trainer.batch_indices(t)`` and the loss
  ``(1/B) Σ_i w_i CE_i`` with ``w = data_weights`` (a leaf tensor, all ones);
* step ``t`` uses the learning rate ``trainer.lr · lr[t]`` with ``lr`` a leaf tensor (all ones);
* the output is ``objective`` (mean validation cross-entropy) at the final parameters, and the
  metagradient ``(dL/dlr, dL/dw)`` comes from one ``torch.autograd.grad`` through the whole
  unrolled graph, which is how all these libraries work: their memory grows with T.

Where the libraries' formulas differ from ``mgd``'s (``torch.optim``'s), the benchmark reports
the difference as it is (``peers.md`` §2):

* **higher**'s differentiable Adam adds ``ε`` to ``√v`` *before* bias correction, so its
  effective ``ε`` is ``ε/√(1-β₂^t)``; its ``dL/dw`` differs from the exact one by O(1).
  higher masks ``v == 0`` itself, so it needs no ``eps_root``.
* **TorchOpt**'s Adam with ``eps_root = 0`` (its default) gives NaN metagradients wherever a
  second moment is exactly zero (the digits split has constant pixels). Its ``eps_root`` sits
  where ``mgd``'s does (``√(v̂ + eps_root) + ε``), so the adapters pass ``mgd``'s value
  (``trainer.optimizer.eps_root``, default 1e-16; :data:`TORCHOPT_EPS_ROOT` overrides it):
  the same formula, forward-neutral to well under ``ε``. ``peers.md`` used 1e-30, against a
  reference without ``eps_root``; here that would be a different formula, and dL/dw would
  differ by 7.6e-3 (float64, T = 100, Adam), as much as ``mgd``'s own full unroll with 1e-30.
  TorchOpt computes ``1 - β^t`` in float32 even for float64 parameters, which limits its
  float64 agreement to about 1e-5 at T = 100.

The libraries are imported inside the adapters only: ``mgd`` and its tests never need them
(``pip install -e ".[bench]"`` installs the pinned versions).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

__all__ = ["PEER_METHODS", "REQUIRES", "missing_libraries", "peer_metagradient"]

Objective = Callable[[Mapping[str, Tensor]], Tensor]
Result = tuple[float, dict[str, Tensor]]

#: TorchOpt's Adam ``eps_root``; ``None`` takes ``mgd``'s (``trainer.optimizer.eps_root``), the
#: same formula as the reference. ``peers.md`` used 1e-30 (against a reference without one).
TORCHOPT_EPS_ROOT: float | None = None

#: The Python package each peer method needs (installed by the ``bench`` extra).
REQUIRES = {"higher": "higher", "torchopt": "torchopt", "torchopt-meta": "torchopt"}
PEER_METHODS = tuple(REQUIRES)


def missing_libraries(methods: list[str]) -> dict[str, str]:
    """``method -> package`` for the chosen peer methods whose library is not installed."""
    return {
        m: REQUIRES[m]
        for m in methods
        if m in REQUIRES and importlib.util.find_spec(REQUIRES[m]) is None
    }


# ------------------------------------------------------------------------------- shared pieces


def _meta_leaves(trainer: Any) -> tuple[Tensor, Tensor]:
    """Leaf tensors for the two metaparameters at their neutral value (all ones)."""
    options = {"dtype": trainer.dtype, "device": trainer.device}
    lr = torch.ones(trainer.steps, **options, requires_grad=True)
    weights = torch.ones(trainer.num_train, **options, requires_grad=True)
    return lr, weights


def _batch(trainer: Any, t: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, index)`` of step ``t``: the trainer's own batch order."""
    index = trainer.batch_indices(t)
    return trainer.x_train[index], trainer.y_train[index], index


def _weighted_loss(logits: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """``(1/B) Σ_i w_i CE_i``, written as ``Trainer.batch_loss`` writes it."""
    losses = weights * F.cross_entropy(logits, y, reduction="none")
    return losses.sum() / len(losses)


def _initial_model(trainer: Any) -> torch.nn.Module:
    """A private copy of the trainer's model (identical initial parameters), in train mode."""
    model = copy.deepcopy(trainer.model)
    model.train()
    return model


def _finish(
    objective: Objective, params: Mapping[str, Tensor], lr: Tensor, weights: Tensor
) -> Result:
    """Evaluate the objective at the final parameters and differentiate the whole unroll."""
    value = objective(dict(params))
    grad_lr, grad_w = torch.autograd.grad(value, (lr, weights), allow_unused=True)
    grads = {
        "lr": torch.zeros_like(lr) if grad_lr is None else grad_lr.detach(),
        "data_weights": torch.zeros_like(weights) if grad_w is None else grad_w.detach(),
    }
    return float(value.detach()), grads


def _optimizer_kind(trainer: Any) -> str:
    """``"sgd"`` or ``"adam"``; refuses settings the adapters do not reproduce."""
    opt = trainer.optimizer
    if trainer.weight_decay or trainer.warmup_steps:
        raise ValueError("the peer adapters reproduce runs without weight decay or warm-up only")
    if set(trainer.metaparams) != {"lr", "data_weights"}:
        raise ValueError("the peer adapters differentiate exactly (lr, data_weights)")
    if opt.name == "sgd" and not opt.nesterov:
        return "sgd"
    if opt.name == "adam":
        return "adam"
    raise ValueError(f"no peer adapter for optimizer {opt!r}")


# ------------------------------------------------------------------------------- higher


def higher_metagradient(trainer: Any, objective: Objective) -> Result:
    """higher 0.2.1: ``innerloop_ctx`` over differentiable copies of ``torch.optim`` SGD/Adam.

    The per-step LR goes in through ``override={"lr": [lr_t]}`` (a tensor in the graph), as
    higher documents for differentiable hyperparameters.
    """
    import higher

    kind = _optimizer_kind(trainer)
    model = _initial_model(trainer)
    o = trainer.optimizer
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=trainer.lr, momentum=o.momentum)
    else:
        betas = (o.beta1, o.beta2)
        opt = torch.optim.Adam(model.parameters(), lr=trainer.lr, betas=betas, eps=o.eps)
    names = [name for name, _ in model.named_parameters()]
    lr, weights = _meta_leaves(trainer)
    # copy_initial_weights=True: the unroll starts from copies, and no gradient flows into the
    # initial weights (we do not want one).
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for t in range(trainer.steps):
            x, y, index = _batch(trainer, t)
            loss = _weighted_loss(fmodel(x), y, weights[index])
            diffopt.step(loss, override={"lr": [trainer.lr * lr[t]]})
        return _finish(objective, dict(zip(names, fmodel.fast_params)), lr, weights)


# ------------------------------------------------------------------------------- TorchOpt


def _eps_root(trainer: Any) -> float:
    """TorchOpt Adam's ``eps_root``: positive, or its metagradients are NaN (module docstring)."""
    return trainer.optimizer.eps_root if TORCHOPT_EPS_ROOT is None else TORCHOPT_EPS_ROOT


def _torchopt_transformation(trainer: Any, lr: Any) -> Any:
    """``torchopt.sgd`` / ``torchopt.adam`` with the trainer's settings and learning rate ``lr``."""
    import torchopt

    o = trainer.optimizer
    if _optimizer_kind(trainer) == "sgd":
        return torchopt.sgd(lr=lr, momentum=o.momentum)
    return torchopt.adam(lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, eps_root=_eps_root(trainer))


def torchopt_metagradient(trainer: Any, objective: Objective) -> Result:
    """TorchOpt 0.7.3, functional API: ``update(..., inplace=False)`` over explicit parameters.

    The model runs through ``torch.func.functional_call``. The transformation has the constant
    base LR; step ``t`` multiplies its updates by ``lr[t]``, which is the same per-step LR
    ``base · lr[t]`` and keeps ``lr`` in the graph.
    """
    import torchopt

    model = _initial_model(trainer)
    names = [name for name, _ in model.named_parameters()]
    # Leaves that require grad: the first inner gradient is taken with respect to them.
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    transformation = _torchopt_transformation(trainer, trainer.lr)
    state = transformation.init(params)
    lr, weights = _meta_leaves(trainer)
    for t in range(trainer.steps):
        x, y, index = _batch(trainer, t)
        logits = functional_call(model, dict(zip(names, params)), (x,))
        loss = _weighted_loss(logits, y, weights[index])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        updates, state = transformation.update(grads, state, params=params, inplace=False)
        updates = tuple(u * lr[t] for u in updates)
        params = torchopt.apply_updates(params, updates, inplace=False)
    return _finish(objective, dict(zip(names, params)), lr, weights)


def torchopt_meta_metagradient(trainer: Any, objective: Objective) -> Result:
    """TorchOpt 0.7.3, ``MetaSGD`` / ``MetaAdam`` over the module itself.

    The per-step LR is a schedule callable, ``count -> base · lr[count]``: TorchOpt multiplies
    the updates by it out of place, so ``lr`` stays in the graph.
    """
    import torchopt

    model = _initial_model(trainer)
    lr, weights = _meta_leaves(trainer)

    def schedule(count: Tensor) -> Tensor:
        return trainer.lr * lr[count]

    o = trainer.optimizer
    if _optimizer_kind(trainer) == "sgd":
        opt = torchopt.MetaSGD(model, lr=schedule, momentum=o.momentum)
    else:
        opt = torchopt.MetaAdam(
            model, lr=schedule, betas=(o.beta1, o.beta2), eps=o.eps, eps_root=_eps_root(trainer)
        )
    for t in range(trainer.steps):
        x, y, index = _batch(trainer, t)
        opt.step(_weighted_loss(model(x), y, weights[index]))
    # MetaOptimizer.step swaps the module's parameters for the new (non-leaf) tensors.
    return _finish(objective, dict(model.named_parameters()), lr, weights)


_ADAPTERS: dict[str, Callable[[Any, Objective], Result]] = {
    "higher": higher_metagradient,
    "torchopt": torchopt_metagradient,
    "torchopt-meta": torchopt_meta_metagradient,
}


def peer_metagradient(method: str) -> Callable[[Any, Objective], Result]:
    """The adapter of a peer method; a clear error if its library is missing."""
    if method not in _ADAPTERS:
        raise ValueError(f"unknown peer method {method!r}; choose from {', '.join(_ADAPTERS)}")
    missing = missing_libraries([method])
    if missing:
        raise ModuleNotFoundError(
            f"{method} needs the {missing[method]!r} package: pip install -e \".[bench]\""
        )
    return _ADAPTERS[method]
