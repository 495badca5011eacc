r"""Per-step vector-Jacobian products: pulling the adjoint back through one training step.

Step ``t`` is ``s_{t+1} = h_t(s_t, z)`` with ``s = (θ, o, b)`` (parameters, optimizer state,
buffers). It computes the minibatch gradient ``g = ∇_θ L_t(θ; w)``, ``L_t = (1/B) Σ_i w_i ℓ_i``,
and then the optimizer update ``(θ', o') = U(g, θ, o; η_t, λ)``. Given ``ā_{t+1} =
(θ̄', ō', b̄')``, the reverse pass needs

.. math::
    \bar g = (\partial U/\partial g)^\top \bar a_{t+1},\qquad
    \bar\theta = (\partial U/\partial\theta)^\top \bar a_{t+1} + H_t\,\bar g,\qquad
    \bar o = (\partial U/\partial o)^\top \bar a_{t+1},\qquad
    \bar w_i = \tfrac1B\,\nabla\ell_i(\theta)\cdot\bar g,

plus ``η̄_t, λ̄`` from ``U`` (and from there the metaparameters that set them). Every path
first takes the update's VJP on its own, given ``g``: in closed form
(``Optimizer.update_vjp``, checked against autograd), since ``U`` is a handful of elementwise
operations. They differ in how ``H_t ḡ`` and the per-example terms are obtained:

* :func:`pull_back` on a :class:`GradGraph` (``method.md`` §3.1): the gradient computation
  recorded with ``create_graph=True``, walked backwards once with ``ḡ``: reverse-over-reverse.
  General (any module, BatchNorm buffers, metaparameters that change the inputs) and, on
  small CPU models, the fastest. :func:`double_backward_vjp` records it at the VJP; the
  REPLAY engine's default (``vjp="fused"``) keeps the one its leaf replay recorded.
* :func:`mixed_mode_vjp` (MixFlow-MG, Kemaev et al. 2025): one forward-over-reverse pass, the
  gradient computation run on dual numbers ``θ + ε ḡ`` (:mod:`torch.autograd.forward_ad`),
  whose tangent output is ``H_t ḡ`` and whose per-example losses carry ``∇ℓ_i·ḡ``. No
  second-order graph is stored. ``g`` itself is handed over by the replay that produced
  ``s_{t+1}`` when it can be.

Forward mode does not cover everything: BatchNorm running statistics (their adjoint needs a
reverse pass through the batch statistics), metaparameters that change the minibatch's inputs
(poisons, input shifts) and operators without forward-mode formulas. :func:`mixed_mode_vjp`
then falls back to reverse-over-reverse and says so once per reason (a
:class:`MixedModeFallback` warning). All paths are exact; the tests compare them in float64.

References:
    Kemaev et al., *Scalable Meta-Learning via Mixed-Mode Differentiation* (MixFlow-MG),
    ICML 2025; Pearlmutter, *Fast exact multiplication by the Hessian*, 1994.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from mgd.distributed import first_line
from mgd.metaparams import StepInputs
from mgd.training import Trainer, TrainState

__all__ = [
    "StepVJP", "GradGraph", "grad_graph", "next_state", "pull_back", "double_backward_vjp",
    "mixed_mode_vjp", "MixedModeFallback",
]


class StepVJP(Protocol):
    """``(ā_t, local z̄) = VJP of step t at (s_t, z) applied to ā_{t+1}``.

    Args:
        trainer: the run.
        state: ``s_t`` (detached).
        local: each metaparameter's slice for step ``t`` (detached).
        wrt: names of the metaparameters whose gradient is needed.
        adjoint: ``ā_{t+1}``, one tensor per state tensor.

    Returns:
        ``ā_t`` (one tensor per state tensor) and the gradient of each ``wrt`` slice.
    """

    def __call__(
        self,
        trainer: Trainer,
        state: TrainState,
        local: Mapping[str, Tensor],
        wrt: Sequence[str],
        adjoint: tuple[Tensor, ...],
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]: ...


def _leaves(local: Mapping[str, Tensor], wrt: Sequence[str]) -> dict[str, Tensor]:
    return {
        name: (value.detach().requires_grad_(True) if name in wrt else value.detach())
        for name, value in local.items()
    }


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, like))


def _detached(value):
    return value.detach() if isinstance(value, Tensor) else value


@dataclass
class GradGraph:
    """Step ``step``'s minibatch gradient with the graph that differentiates it once more.

    Only the gradient computation is recorded (``create_graph=True``); the optimizer update,
    a few elementwise operations, is re-run on its own by :func:`pull_back`. A kept graph
    therefore holds the activations and the gradient, not the update's temporaries.

    Attributes:
        params, buffers: leaves aliasing ``s_t``'s parameters and buffers (no copies).
        leaves: the metaparameter slices (leaves for those differentiated).
        inputs: what the step consumed (``lr``, ``weight_decay`` and the example weights keep
            their graph to ``leaves``).
        grad: ``g_t`` (this rank's shard of it with data parallelism), differentiable in
            ``params`` and ``leaves`` (through the weights).
        full_grad: ``g_t`` summed over ranks, detached: what the update consumes.
        new_buffers: the new BatchNorm statistics, differentiable in ``params`` and ``buffers``.
    """

    step: int
    params: Tensor
    buffers: Tensor
    leaves: dict[str, Tensor]
    inputs: StepInputs
    grad: Tensor
    full_grad: Tensor
    new_buffers: Tensor


def grad_graph(
    trainer: Trainer, state: TrainState, local: Mapping[str, Tensor], wrt: Sequence[str]
) -> GradGraph:
    """Compute ``g_t`` at ``s_t`` keeping its graph (see :class:`GradGraph`)."""
    t = state.step
    with torch.enable_grad():
        params = state.params.detach().requires_grad_(True)
        buffers = state.buffers.detach().requires_grad_(True)
        leaves = _leaves(local, wrt)
        inputs = trainer.step_inputs(t, leaves)
        loss, new_buffers = trainer.batch_loss(params, buffers, inputs, t)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
    full_grad = trainer.sum_over_ranks(grad.detach())
    return GradGraph(t, params, buffers, leaves, inputs, grad, full_grad, new_buffers)


def next_state(trainer: Trainer, state: TrainState, graph: GradGraph) -> TrainState:
    """``s_{t+1}`` from a :class:`GradGraph`: the same arithmetic as :meth:`Trainer.step`."""
    with torch.no_grad():
        new_params, new_opt = trainer.optimizer.update(
            graph.full_grad, state.params, state.opt_state, step=state.step,
            lr=graph.inputs.lr.detach(), weight_decay=_detached(graph.inputs.weight_decay),
        )
    return TrainState(new_params, tuple(new_opt), graph.new_buffers.detach(), state.step + 1)


def _update_pullback(
    trainer: Trainer,
    state: TrainState,
    grad: Tensor,
    inputs: StepInputs,
    leaves: Mapping[str, Tensor],
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
    """``(ḡ, ∂U/∂θᵀā, ∂U/∂oᵀā, z̄ through η and λ)``: the VJP of the update ``U`` alone.

    In closed form when the optimizer has ``update_vjp`` (the built-in ones), else by
    autograd over ``U``; ``η̄`` and ``λ̄`` are then chained into the metaparameters.
    """
    optimizer = trainer.optimizer
    if hasattr(optimizer, "update_vjp"):
        n = len(state.opt_state)
        vjp = optimizer.update_vjp(
            grad.detach(), state.params, state.opt_state, adjoint[0], tuple(adjoint[1 : 1 + n]),
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
            extra = torch.autograd.grad(outputs, [leaves[name] for name in wrt], seeds,
                                        allow_unused=True, retain_graph=True)
            _add(local_bar, wrt, extra)
        return vjp.grad, vjp.params, tuple(vjp.state), local_bar
    with torch.enable_grad():
        g = grad.detach().requires_grad_(True)
        theta = state.params.detach().requires_grad_(True)
        moments = tuple(m.detach().requires_grad_(True) for m in state.opt_state)
        new_params, new_moments = trainer.optimizer.update(
            g, theta, moments, step=state.step, lr=inputs.lr, weight_decay=inputs.weight_decay
        )
        outputs = (new_params, *new_moments)
        targets = (g, theta, *moments, *(leaves[name] for name in wrt))
        # retain_graph: a metaparameter's own graph (e.g. lr knots) may be walked again below
        grads = _zeros_for_none(
            torch.autograd.grad(outputs, targets, adjoint[: len(outputs)], allow_unused=True, retain_graph=True),
            targets,
        )
    n = len(moments)
    return grads[0], grads[1], tuple(grads[2 : 2 + n]), dict(zip(wrt, grads[2 + n :]))


def _add(local_bar: dict[str, Tensor], wrt: Sequence[str], extra: Sequence[Tensor | None]) -> None:
    for name, e in zip(wrt, extra):
        if e is not None:
            local_bar[name] = local_bar[name] + e


def pull_back(
    trainer: Trainer,
    state: TrainState,
    graph: GradGraph,
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
    *,
    split: bool = False,
):
    """The VJP of step ``t`` given its :class:`GradGraph`: reverse-over-reverse.

    First the update's VJP gives ``ḡ``; then one backward pass through the kept gradient graph
    gives ``H_t ḡ``, the data-weight terms and the BatchNorm statistics' share. With data
    parallelism the Hessian-vector product is summed over ranks here.

    Returns:
        ``(ā_t, z̄_local)``; with ``split=True``, ``(ā_t, z̄ through the update, z̄ through
        this rank's loss)``: the first is the same on every rank, the second must be summed
        over ranks (see :mod:`mgd.distributed`).
    """
    g_bar, theta_bar, moments_bar, local_bar = _update_pullback(
        trainer, state, graph.full_grad, graph.inputs, graph.leaves, wrt, adjoint
    )
    outputs, seeds = [graph.grad], [g_bar]
    if graph.new_buffers.requires_grad:
        outputs.append(graph.new_buffers)
        seeds.append(adjoint[-1])
    targets = (graph.params, graph.buffers, *(graph.leaves[name] for name in wrt))
    grads = torch.autograd.grad(outputs, targets, seeds, allow_unused=True)
    params_bar, buffers_bar = _zeros_for_none(grads[:2], targets[:2])
    adjoint_t = (theta_bar + trainer.sum_over_ranks(params_bar), *moments_bar, buffers_bar)
    return _result(adjoint_t, local_bar, grads[2:], wrt, split)


def _result(
    adjoint: tuple[Tensor, ...],
    update_bar: dict[str, Tensor],
    loss_bar: Sequence[Tensor | None],
    wrt: Sequence[str],
    split: bool,
):
    """A VJP's return value: z̄ through the update and through the loss, summed or apart."""
    if split:
        return adjoint, update_bar, {
            name: torch.zeros_like(update_bar[name]) if e is None else e for name, e in zip(wrt, loss_bar)
        }
    _add(update_bar, wrt, loss_bar)
    return adjoint, update_bar


def double_backward_vjp(
    trainer: Trainer,
    state: TrainState,
    local: Mapping[str, Tensor],
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """The oracle VJP: recompute ``g_t`` with a graph and differentiate it (``method.md`` §3.1)."""
    return pull_back(trainer, state, grad_graph(trainer, state, local, wrt), wrt, adjoint)


class MixedModeFallback(UserWarning):
    """:func:`mixed_mode_vjp` used double-backward instead (emitted once per reason)."""


_WARNED: set[str] = set()


def _fall_back(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"mixed-mode VJP unavailable ({reason}); using double-backward for these steps "
            "(exact, just slower or larger)",
            MixedModeFallback,
            stacklevel=3,
        )


#: Models that turned out to lack a forward-mode formula, with the reason.
_NO_FORWARD_MODE: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def forward_mode_blocker(trainer: Trainer) -> str | None:
    """Why :func:`mixed_mode_vjp` cannot handle this run at all, or ``None``."""
    if trainer.has_buffers:
        return "the model has BatchNorm running statistics"
    return _NO_FORWARD_MODE.get(trainer.model)


def mixed_mode_vjp(
    trainer: Trainer,
    state: TrainState,
    local: Mapping[str, Tensor],
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
    grad: Tensor | None = None,
    *,
    split: bool = False,
):
    """The VJP of one step by mixed-mode differentiation (see the module docstring).

    Args:
        grad: ``g_t`` (summed over ranks) if the caller already has it (a replay computed
            it); else it is recomputed. ``split``: as in :func:`pull_back`. The other
            arguments are those of :class:`StepVJP`.
    """
    def reverse_over_reverse(reason: str):
        _fall_back(reason)
        return pull_back(trainer, state, grad_graph(trainer, state, local, wrt), wrt, adjoint, split=split)

    blocker = forward_mode_blocker(trainer)
    if blocker is not None:
        return reverse_over_reverse(blocker)
    t = state.step
    params, *opt_state, buffers = state.tensors()
    with torch.enable_grad():
        leaves = _leaves(local, wrt)
        inputs = trainer.step_inputs(t, leaves)
        if inputs.x.requires_grad:
            return reverse_over_reverse("a metaparameter changes the training inputs")
        constant = replace(
            inputs,
            example_weights=None if inputs.example_weights is None else inputs.example_weights.detach(),
        )
        if grad is None:
            p = params.detach().requires_grad_(True)
            loss, _ = trainer.batch_loss(p, buffers, constant, t)
            (grad,) = torch.autograd.grad(loss, p)
            grad = trainer.sum_over_ranks(grad)
    # 1. The optimizer update, differentiated on its own given g (cheap: elementwise).
    g_bar, theta_bar, moments_bar, local_bar = _update_pullback(
        trainer, state, grad, inputs, leaves, wrt, adjoint
    )

    # 2. Forward-over-reverse: the gradient computation on θ + ε ḡ.
    try:
        with fwAD.dual_level(), torch.enable_grad():
            p = params.detach().requires_grad_(True)
            losses, _ = trainer.example_losses(fwAD.make_dual(p, g_bar), buffers, constant, t)
            (dual_grad,) = torch.autograd.grad(trainer.weighted_mean(losses, constant), p, create_graph=True)
            hvp = fwAD.unpack_dual(dual_grad).tangent
            loss_tangents = fwAD.unpack_dual(losses).tangent  # ∇ℓ_i · ḡ
    except (NotImplementedError, RuntimeError) as error:
        text = str(error)
        if "forward" not in text.lower() and "jvp" not in text.lower():
            raise  # not a missing forward-mode formula: a real error
        reason = f"an operation has no forward-mode derivative: {first_line(error)}"
        _NO_FORWARD_MODE[trainer.model] = reason
        return reverse_over_reverse(reason)
    if hvp is not None:
        theta_bar = theta_bar + trainer.sum_over_ranks(hvp.detach())

    # 3. Data weights: ∂L/∂w_i · ḡ = ∇ℓ_i·ḡ / B, chained into the metaparameters behind w.
    weights = inputs.example_weights
    extra: Sequence[Tensor | None] = [None] * len(wrt)
    if weights is not None and weights.requires_grad and loss_tangents is not None:
        weight_bar = loss_tangents.detach() / (constant.batch_size or len(loss_tangents))
        extra = torch.autograd.grad(weights, [leaves[name] for name in wrt], weight_bar, allow_unused=True)
    return _result((theta_bar, *moments_bar, torch.zeros_like(buffers)), local_bar, extra, wrt, split)
