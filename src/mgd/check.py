"""Independent references for metagradients: the full unroll and finite differences.

These are the correctness oracles the tests (and users) compare REPLAY with:

* :func:`full_unroll_metagradient` builds one autograd graph through all T steps
  (``create_graph=True`` at every step) and calls ``torch.autograd.grad`` once. It shares the
  step function with REPLAY but none of its reverse-pass machinery. Memory grows with T.
* :func:`directional_finite_difference` evaluates ``f(z ± h d)`` by whole training runs, a
  check that shares nothing with automatic differentiation.

Both are meant for float64.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mgd.step import TrainingRun, math_attention

__all__ = [
    "full_unroll_metagradient", "errors_against_full_unroll", "train_and_evaluate",
    "directional_finite_difference", "relative_error",
]


def full_unroll_metagradient(
    trainer: TrainingRun,
    objective: Callable[[Mapping[str, Tensor]], Tensor],
    meta: Mapping[str, Tensor] | None = None,
    *,
    wrt: Sequence[str] | None = None,
) -> tuple[float, dict[str, Tensor]]:
    """``(f(z), ∂f/∂z)`` by plain reverse-mode autograd through the whole unrolled run."""
    values = trainer.check_meta(meta or {})
    wrt = list(values) if wrt is None else list(wrt)
    with torch.enable_grad(), math_attention():
        leaves = {
            name: (v.detach().clone().requires_grad_(True) if name in wrt else v)
            for name, v in values.items()
        }
        state = trainer.init_state()
        tensors = tuple(t.detach().clone().requires_grad_(True) for t in state.tensors())
        for t in range(trainer.steps):
            tensors = trainer.differentiable_step(tensors, t, trainer.local_meta(leaves, t))
        value = objective(trainer.named_tensors(tensors[0], tensors[-1]))
        grads = torch.autograd.grad(value, [leaves[name] for name in wrt], allow_unused=True)
    return float(value.detach()), {
        name: (torch.zeros_like(leaves[name]) if g is None else g.detach())
        for name, g in zip(wrt, grads)
    }


def errors_against_full_unroll(trainer: TrainingRun, objective, result) -> dict[str, float]:
    """Relative error of each metagradient in ``result`` (:class:`~mgd.replay.MetaGradient`)
    against :func:`full_unroll_metagradient` of the same run (use float64)."""
    _, reference = full_unroll_metagradient(trainer, objective, wrt=list(result.grads))
    return {name: relative_error(result.grads[name], reference[name]) for name in result.grads}


def train_and_evaluate(
    trainer: TrainingRun,
    objective: Callable[[Mapping[str, Tensor]], Tensor],
    meta: Mapping[str, Tensor] | None = None,
) -> float:
    """``f(z)``: train from scratch with metaparameters ``meta`` and evaluate ``φ(θ_T)``."""
    final = trainer.run(meta)
    with torch.no_grad(), math_attention():
        return float(objective(trainer.named_tensors(final.params, final.buffers)))


def directional_finite_difference(
    trainer: TrainingRun,
    objective: Callable[[Mapping[str, Tensor]], Tensor],
    meta: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    h: float,
) -> float:
    """Central difference ``(f(z + h d) - f(z - h d)) / 2h`` of whole training runs."""
    values = trainer.check_meta(meta)

    def shifted(sign: float) -> dict[str, Tensor]:
        return {
            name: v + sign * h * direction[name] if name in direction else v
            for name, v in values.items()
        }

    return (
        train_and_evaluate(trainer, objective, shifted(+1.0))
        - train_and_evaluate(trainer, objective, shifted(-1.0))
    ) / (2.0 * h)


def relative_error(actual: Tensor | float, expected: Tensor | float) -> float:
    """``‖actual - expected‖ / ‖expected‖`` (0 when both are zero)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    denominator = expected.norm()
    difference = (actual - expected).norm()
    if denominator == 0:
        return float(difference)
    return float(difference / denominator)
