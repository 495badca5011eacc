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

These are strategies over the views of the one step (:mod:`mgd.step`): none of them defines
a step of its own. Every path that recomputes a step also returns the per-example losses it
computed, which the REPLAY engine compares bit for bit with the forward pass's.

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

from mgd.batches import tree_leaves, tree_map
from mgd.distributed import first_line
from mgd.errors import UserError
from mgd.step import (
    GradGraph, TrainingRun, TrainState, add_into, metaparameter_leaves, second_backward, second_order_grad, seeded_grad,
    zeros_for_none,
)

__all__ = [
    "StepVJP", "VJPResult", "GradGraph", "pull_back", "double_backward_vjp", "mixed_mode_vjp", "MixedModeFallback",
]


class StepVJP(Protocol):
    """``(ā_t, local z̄) = VJP of step t at (s_t, z) applied to ā_{t+1}`` (a custom strategy).

    Args:
        run: the :class:`~mgd.step.TrainingRun`.
        state: ``s_t`` (detached).
        local: each metaparameter's slice for step ``t`` (detached).
        wrt: names of the metaparameters whose gradient is needed.
        adjoint: ``ā_{t+1}``, one tensor per state tensor.

    Returns:
        ``ā_t`` (one tensor per state tensor) and the gradient of each ``wrt`` slice.
    """

    def __call__(
        self,
        run: TrainingRun,
        state: TrainState,
        local: Mapping[str, Tensor],
        wrt: Sequence[str],
        adjoint: tuple[Tensor, ...],
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]: ...


@dataclass
class VJPResult:
    """What a built-in per-step VJP returns.

    Attributes:
        adjoint: ``ā_t``.
        update_bar: z̄ reaching the metaparameters through the update (``η``, ``λ``): the same
            on every rank.
        loss_bar: z̄ through this rank's loss (data weights, inputs): summed over ranks once.
        losses: the per-example losses of the step if it was recomputed here (detached), for
            the engine's fingerprint; ``None`` when a kept graph was used.
        fell_back: :func:`mixed_mode_vjp` used double-backward for this step.
    """

    adjoint: tuple[Tensor, ...]
    update_bar: dict[str, Tensor]
    loss_bar: dict[str, Tensor]
    losses: Tensor | None = None
    fell_back: bool = False  # mixed mode ran reverse-over-reverse for this step

    def local_bar(self) -> dict[str, Tensor]:
        """``update_bar + loss_bar``: the slice gradients of one process."""
        return {name: self.update_bar[name] + self.loss_bar[name] for name in self.update_bar}


def _loss_bar(wrt: Sequence[str], like: Mapping[str, Tensor], grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
    return {name: torch.zeros_like(like[name]) if g is None else g for name, g in zip(wrt, grads)}


def pull_back(
    run: TrainingRun,
    state: TrainState,
    graph: GradGraph,
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
    losses: Tensor | None = None,
) -> VJPResult:
    """The VJP of step ``t`` given its :class:`GradGraph`: reverse-over-reverse.

    First the update's VJP gives ``ḡ``; then one backward pass through the kept gradient graph
    gives ``H_t ḡ``, the data-weight terms and the BatchNorm statistics' share. With data
    parallelism the Hessian-vector product is summed over ranks here.
    """
    g_bar, theta_bar, moments_bar, update_bar = run.update_pullback(
        state, graph.full_grad, graph.inputs, graph.leaves, wrt, adjoint
    )
    outputs, seeds = [graph.grad], [g_bar]
    if graph.new_buffers.requires_grad:
        outputs.append(graph.new_buffers)
        seeds.append(adjoint[-1])
    targets = (graph.params, graph.buffers, *(graph.leaves[name] for name in wrt))
    grads = second_backward(outputs, targets, seeds, allow_unused=True)
    params_bar, buffers_bar = zeros_for_none(grads[:2], targets[:2])
    adjoint_t = (theta_bar + run.sum_over_ranks(params_bar), *moments_bar, buffers_bar)
    return VJPResult(adjoint_t, update_bar, _loss_bar(wrt, graph.leaves, grads[2:]), losses)


def double_backward_vjp(
    run: TrainingRun,
    state: TrainState,
    local: Mapping[str, Tensor],
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
) -> VJPResult:
    """The oracle VJP: recompute ``g_t`` with a graph and differentiate it (``method.md`` §3.1).

    With micro-batches the step is recomputed and pulled back one micro-batch at a time (last
    to first, carrying the BatchNorm statistics' adjoint between them), so its memory is that
    of one micro-batch.
    """
    t = state.step
    if run.micro_batch is None or len(run.shard_indices(t)) <= run.micro_batch:
        graph = run.linearize(state, local, wrt)
        return pull_back(run, state, graph, wrt, adjoint, graph.losses)
    leaves = metaparameter_leaves(local, wrt)
    with torch.enable_grad():
        inputs = run.step_inputs(t, leaves)
    spans = run.chunks(inputs)
    # The full gradient first (no graph), for the update's VJP; it also gives the BatchNorm
    # statistics each micro-batch starts from.
    entering: list[Tensor] = []
    grad, _, losses = run.gradient(state, _constant(inputs), entering)
    g_bar, theta_bar, moments_bar, update_bar = run.update_pullback(state, grad, inputs, leaves, wrt, adjoint)
    params_bar = torch.zeros_like(state.params)
    buffers_bar = adjoint[-1]
    loss_bar: dict[str, Tensor] = {name: torch.zeros_like(leaves[name]) for name in wrt}
    for c in reversed(range(len(spans))):
        with torch.enable_grad():
            params = state.params.detach().requires_grad_(True)
            buffers = entering[c].detach().requires_grad_(True)
            loss, _, new_buffers = run.chunk_losses(params, buffers, inputs, t, c, spans[c])
            (g,) = second_order_grad(loss, params, run.stateless.module)
            outputs, seeds = [g], [g_bar]
            if new_buffers.requires_grad:
                outputs.append(new_buffers)
                seeds.append(buffers_bar)
            targets = (params, buffers, *(leaves[name] for name in wrt))
            # retain_graph: the inputs' graph to the metaparameters serves every micro-batch;
            # each micro-batch's own graph is freed when its tensors go out of scope.
            grads = second_backward(outputs, targets, seeds, allow_unused=True, retain_graph=True)
        p_bar, b_bar = zeros_for_none(grads[:2], targets[:2])
        params_bar = params_bar + p_bar
        buffers_bar = b_bar
        add_into(loss_bar, wrt, grads[2:])
    adjoint_t = (theta_bar + run.sum_over_ranks(params_bar), *moments_bar, buffers_bar)
    return VJPResult(adjoint_t, update_bar, loss_bar, losses)


def _constant(inputs):
    """The same inputs with every tensor detached (no graph to the metaparameters)."""
    return replace(
        inputs,
        batch=tree_map(lambda t: t.detach(), inputs.batch),
        example_weights=None if inputs.example_weights is None else inputs.example_weights.detach(),
        lr=inputs.lr.detach(),
        weight_decay=inputs.weight_decay.detach() if isinstance(inputs.weight_decay, Tensor) else inputs.weight_decay,
    )


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


def forward_mode_blocker(run: TrainingRun) -> str | None:
    """Why :func:`mixed_mode_vjp` cannot handle this run at all, or ``None``."""
    if run.has_buffers:
        return "the model has BatchNorm running statistics"
    return _NO_FORWARD_MODE.get(run.model)


def mixed_mode_vjp(
    run: TrainingRun,
    state: TrainState,
    local: Mapping[str, Tensor],
    wrt: Sequence[str],
    adjoint: tuple[Tensor, ...],
    grad: Tensor | None = None,
) -> VJPResult:
    """The VJP of one step by mixed-mode differentiation (see the module docstring).

    Args:
        grad: ``g_t`` (summed over ranks) if the caller already has it (a replay computed
            it); else it is recomputed. The other arguments are those of :class:`StepVJP`.
    """
    def reverse_over_reverse(reason: str) -> VJPResult:
        _fall_back(reason)
        return replace(double_backward_vjp(run, state, local, wrt, adjoint), fell_back=True)

    blocker = forward_mode_blocker(run)
    if blocker is not None:
        return reverse_over_reverse(blocker)
    t = state.step
    params, *opt_state, buffers = state.tensors()
    leaves = metaparameter_leaves(local, wrt)
    with torch.enable_grad():
        inputs = run.step_inputs(t, leaves)
    if any(x.requires_grad for x in tree_leaves(inputs.batch)):
        return reverse_over_reverse("a metaparameter changes the training inputs")
    constant = _constant(inputs)
    if grad is None:
        grad, _, _ = run.gradient(state, constant)
    # 1. The update (and clipping), differentiated on its own given g (cheap: elementwise).
    g_bar, theta_bar, moments_bar, update_bar = run.update_pullback(state, grad, inputs, leaves, wrt, adjoint)

    # 2. Forward-over-reverse, micro-batch by micro-batch: the gradient on θ + ε ḡ.
    hvp_total, tangents, primals = None, [], []
    try:
        for c, span in enumerate(run.chunks(constant)):
            with fwAD.dual_level(), torch.enable_grad():
                p = params.detach().requires_grad_(True)
                dual = fwAD.make_dual(p, g_bar)
                loss, losses, _ = run.chunk_losses(dual, buffers, constant, t, c, span)
                (dual_grad,) = torch.autograd.grad(loss, p, create_graph=True)
                hvp = fwAD.unpack_dual(dual_grad).tangent
                unpacked = fwAD.unpack_dual(losses)
                tangents.append(unpacked.tangent)  # ∇ℓ_i · ḡ
                primals.append(unpacked.primal.detach())
            if hvp is not None:
                hvp_total = hvp.detach() if hvp_total is None else hvp_total + hvp.detach()
    except (NotImplementedError, RuntimeError) as error:
        text = str(error)
        if "forward" not in text.lower() and "jvp" not in text.lower():
            raise  # not a missing forward-mode formula: a real error
        reason = f"an operation has no forward-mode derivative: {first_line(error)}"
        _NO_FORWARD_MODE[run.model] = reason
        return reverse_over_reverse(reason)
    if hvp_total is not None:
        theta_bar = theta_bar + run.sum_over_ranks(hvp_total)

    # 3. Data weights: ∂L/∂w_i · ḡ = ∇ℓ_i·ḡ / B, chained into the metaparameters behind w.
    weights = inputs.example_weights
    extra: Sequence[Tensor | None] = [None] * len(wrt)
    if weights is not None and weights.requires_grad and all(t is not None for t in tangents):
        weight_bar = torch.cat([t.detach() for t in tangents]) / (constant.batch_size or len(inputs.index))
        extra = seeded_grad([weights], [leaves[name] for name in wrt], [weight_bar], allow_unused=True)
    adjoint_t = (theta_bar, *moments_bar, torch.zeros_like(buffers))
    return VJPResult(adjoint_t, update_bar, _loss_bar(wrt, leaves, extra), torch.cat(primals))
