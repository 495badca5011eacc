r"""Differentiable, out-of-place optimizers over a flat parameter vector.

Each optimizer is a frozen dataclass with pure methods, in the style of optax:

* ``init(params) -> state``: the optimizer state, a tuple of tensors shaped like ``params``;
* ``update(grad, params, state, *, step, lr, weight_decay) -> (params, state)``;
* ``update_vjp(...)``: the update's vector-Jacobian product in closed form (:class:`UpdateVJP`),
  which the reverse pass uses instead of running autograd over the update's dozen
  elementwise operations (it is checked against autograd in float64);
* ``update_in_place(...)`` (optional): ``update`` with no graph, written into the given
  tensors, for training loops that give up the old state (``TrainingRun.run``).

``update`` updates nothing in place, so autograd can differentiate a step with respect to the
parameters, the optimizer state, the learning rate and the weight decay, which is what the
REPLAY reverse pass needs. ``lr`` and ``weight_decay`` may be Python floats or 0-dim tensors
(metaparameters). ``step`` is the 0-based index of the step being taken.

The formulas follow ``torch.optim`` (tests check parity over hundreds of steps in float64):

SGD with momentum :math:`\mu`, coupled weight decay :math:`\lambda` (dampening 0):

.. math::
    \tilde g = g + \lambda\theta,\quad m' = \mu m + \tilde g,\quad
    \theta' = \theta - \eta\,(\tilde g + \mu m' \text{ if Nesterov else } m').

Adam / AdamW, with step count :math:`c = \text{step} + 1` and bias corrections computed in
Python float64 (never as low-precision tensors):

.. math::
    m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\\
    \theta' = \theta - \frac{\eta}{1-\beta_1^c}\,
        \frac{m'}{\sqrt{v'/(1-\beta_2^c) + \epsilon_\text{root}} + \epsilon}.

Adam adds :math:`\lambda\theta` to :math:`g` (L2); AdamW first scales
:math:`\theta \leftarrow (1-\eta\lambda)\theta` (decoupled).

.. danger::
   ``eps_root`` must be positive when differentiating *through* Adam. A coordinate whose
   gradient has always been exactly zero (a weight fed by a constant input pixel) has
   :math:`v' = 0`, and the derivative of :math:`\sqrt{v}` there is infinite; times a zero
   adjoint it gives NaN, which then spreads to every metagradient entry. The default
   ``eps_root = 1e-16`` puts a floor of 1e-8 (= ``eps``) under the square root, changing the
   forward pass by well under ``eps``. With ``eps_root = 0`` the update equals
   ``torch.optim.Adam`` bit for bit in formula (:math:`\sqrt{v'}/\sqrt{1-\beta_2^c} + \epsilon`).

References:
    Kingma & Ba, *Adam*, ICLR 2015; Loshchilov & Hutter, *Decoupled Weight Decay
    Regularization*, ICLR 2019; optax's ``scale_by_adam`` (``eps_root``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = ["SGD", "Adam", "Optimizer", "UpdateVJP", "make_optimizer", "OPTIMIZERS"]

Scalar = Union[float, Tensor]


@dataclass(frozen=True)
class UpdateVJP:
    """The adjoints of the update's inputs, given those of its outputs.

    Attributes:
        grad, params: adjoints of ``g`` and ``θ``.
        state: adjoints of the optimizer state tensors.
        lr, weight_decay: adjoints of the learning rate and weight decay (0-dim tensors).
    """

    grad: Tensor
    params: Tensor
    state: tuple[Tensor, ...]
    lr: Tensor
    weight_decay: Tensor


def _value(x: Scalar) -> Scalar:
    return x.detach() if isinstance(x, Tensor) else x


def _is_zero(value: Scalar) -> bool:
    # A Python 0.0 skips the term entirely, as torch.optim does; a tensor (a metaparameter,
    # possibly zero) must stay in the graph so that its gradient exists.
    return not isinstance(value, Tensor) and value == 0.0


def _without_graph(*values) -> bool:
    """True when no autograd graph is being recorded through any of ``values``: the update may
    then write its temporaries in place (the same operations in the same order, so the same
    bits, with fewer allocations of parameter-sized buffers; a fresh tensor per output, so
    states stored as checkpoints are never written again)."""
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(v, Tensor) and v.requires_grad for v in values)


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with optional (Nesterov) momentum and coupled weight decay.

    Args:
        momentum: :math:`\\mu \\ge 0`; 0 means no momentum buffer.
        nesterov: use Nesterov momentum (requires ``momentum > 0``).
    """

    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.momentum < 0:
            raise UserError(f"momentum must be >= 0, got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise UserError("Nesterov momentum needs momentum > 0 (e.g. --momentum 0.9)")

    @property
    def name(self) -> str:
        return "sgd"

    def init(self, params: Tensor) -> tuple[Tensor, ...]:
        return (torch.zeros_like(params),) if self.momentum else ()

    def update(
        self,
        grad: Tensor,
        params: Tensor,
        state: tuple[Tensor, ...],
        *,
        step: int,
        lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        del step  # SGD has no step-dependent term
        if _without_graph(grad, params, *state, lr, weight_decay):
            return self._update_in_place(grad, params, state, lr, weight_decay)
        if not _is_zero(weight_decay):
            grad = grad + weight_decay * params
        if not self.momentum:
            return params - lr * grad, ()
        (buf,) = state
        buf = self.momentum * buf + grad
        direction = grad + self.momentum * buf if self.nesterov else buf
        return params - lr * direction, (buf,)

    def update_in_place(
        self, grad: Tensor, params: Tensor, state: tuple[Tensor, ...], *, step: int, lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """:meth:`update` with no graph, writing the new state into ``params`` and ``state``
        (which the caller gives up, as ``torch.optim`` does): the same operations, the same bits."""
        del step
        return self._update_in_place(grad, params, state, lr, weight_decay, donated=True)

    def _update_in_place(self, grad, params, state, lr, weight_decay, donated=False):
        """:meth:`update`'s expressions, term for term, with in-place temporaries; ``donated``:
        into the given tensors instead of fresh ones."""
        if not _is_zero(weight_decay):
            grad = torch.mul(params, weight_decay).add_(grad)  # grad + λθ
        if not self.momentum:
            change = torch.mul(grad, lr)
            return (params.sub_(change) if donated else torch.sub(params, change, out=change)), ()
        buf = (state[0].mul_(self.momentum) if donated else torch.mul(state[0], self.momentum)).add_(grad)  # μ·buf + g
        change = torch.mul(buf, self.momentum).add_(grad).mul_(lr) if self.nesterov else torch.mul(buf, lr)
        return (params.sub_(change) if donated else torch.sub(params, change, out=change)), (buf,)

    def update_vjp(
        self,
        grad: Tensor,
        params: Tensor,
        state: tuple[Tensor, ...],
        params_bar: Tensor,
        state_bar: tuple[Tensor, ...],
        *,
        step: int,
        lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> UpdateVJP:
        r"""Closed-form VJP of :meth:`update` (``g̃ = g + λθ``, ``d`` the step direction):

        .. math::
            \bar d = -\eta\bar\theta',\ \bar\eta = -\langle\bar\theta', d\rangle,\
            \bar m'_{tot} = \bar m' + \bar d\,(\mu \text{ if Nesterov else } 1),\
            \bar{\tilde g} = \bar m'_{tot} + (\bar d \text{ if Nesterov}),\
            \bar m = \mu\bar m'_{tot},\ \bar\theta = \bar\theta' + \lambda\bar{\tilde g},\
            \bar\lambda = \langle\bar{\tilde g}, \theta\rangle.
        """
        del step
        lr, weight_decay = _value(lr), _value(weight_decay)
        if not _is_zero(weight_decay):
            grad = grad + weight_decay * params
        direction_bar = -lr * params_bar
        if not self.momentum:
            lr_bar = -(params_bar * grad).sum()
            grad_bar, momentum_bar = direction_bar, ()
        else:
            (buf,) = state
            new_buf = self.momentum * buf + grad
            direction = grad + self.momentum * new_buf if self.nesterov else new_buf
            lr_bar = -(params_bar * direction).sum()
            buf_bar = state_bar[0] + (self.momentum * direction_bar if self.nesterov else direction_bar)
            grad_bar = buf_bar + direction_bar if self.nesterov else buf_bar
            momentum_bar = (self.momentum * buf_bar,)
        if _is_zero(weight_decay):
            params_total, decay_bar = params_bar, torch.zeros_like(lr_bar)
        else:
            params_total, decay_bar = params_bar + weight_decay * grad_bar, (grad_bar * params).sum()
        return UpdateVJP(grad_bar, params_total, momentum_bar, lr_bar, decay_bar)


@dataclass(frozen=True)
class Adam:
    """Adam (L2 weight decay) or, with ``decoupled=True``, AdamW.

    Args:
        beta1, beta2: moment decay rates in [0, 1).
        eps: added to the square root of the second moment.
        eps_root: added *inside* the square root; keep it positive when differentiating
            through Adam (see the module docstring).
        decoupled: AdamW's decoupled weight decay instead of Adam's L2 term.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 1e-16
    decoupled: bool = False

    def __post_init__(self) -> None:
        for label, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise UserError(f"Adam {label} must be in [0, 1), got {beta}")
        if self.eps < 0 or self.eps_root < 0:
            raise UserError("Adam eps and eps_root must be >= 0")

    @property
    def name(self) -> str:
        return "adamw" if self.decoupled else "adam"

    def init(self, params: Tensor) -> tuple[Tensor, ...]:
        return (torch.zeros_like(params), torch.zeros_like(params))

    def update(
        self,
        grad: Tensor,
        params: Tensor,
        state: tuple[Tensor, ...],
        *,
        step: int,
        lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        exp_avg, exp_avg_sq = state
        bias1, bias2 = self._bias_corrections(step)
        if _without_graph(grad, params, *state, lr, weight_decay):
            return self._update_in_place(grad, params, state, lr, weight_decay, bias1, bias2)
        if not _is_zero(weight_decay):
            if self.decoupled:
                params = params * (1.0 - lr * weight_decay)
            else:
                grad = grad + weight_decay * params
        exp_avg = torch.lerp(exp_avg, grad, 1.0 - self.beta1)  # the same rounding as torch.optim
        exp_avg_sq = self.beta2 * exp_avg_sq + (1.0 - self.beta2) * (grad * grad)
        # sqrt(v/b2 + eps_root) written as sqrt(v + eps_root*b2)/sqrt(b2): identical maths, and
        # with eps_root = 0 exactly torch.optim's sqrt(v)/sqrt(b2).
        if self.eps_root:
            root = torch.sqrt(exp_avg_sq + self.eps_root * bias2)
        else:
            root = torch.sqrt(exp_avg_sq)
        denom = root / math.sqrt(bias2) + self.eps
        return params - (lr / bias1) * (exp_avg / denom), (exp_avg, exp_avg_sq)

    def _bias_corrections(self, step: int) -> tuple[float, float]:
        """``(1 - β₁^(t+1), 1 - β₂^(t+1))`` as Python floats (float64), whatever the tensor dtype."""
        count = step + 1
        return 1.0 - self.beta1**count, 1.0 - self.beta2**count

    def update_in_place(
        self, grad: Tensor, params: Tensor, state: tuple[Tensor, ...], *, step: int, lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """:meth:`update` with no graph, writing the new state into ``params`` and ``state``
        (which the caller gives up, as ``torch.optim`` does): the same operations, the same bits."""
        return self._update_in_place(grad, params, state, lr, weight_decay, *self._bias_corrections(step),
                                     donated=True)

    def _update_in_place(self, grad, params, state, lr, weight_decay, bias1, bias2, donated=False):
        """:meth:`update`'s expressions, term for term, with in-place temporaries (about half
        the time on a large model, where the update is memory-bound); ``donated``: into the
        given tensors instead of fresh ones."""
        exp_avg, exp_avg_sq = state
        if not _is_zero(weight_decay):
            if self.decoupled:
                shrink = 1.0 - lr * weight_decay
                params = params.mul_(shrink) if donated else params * shrink
            else:
                grad = torch.mul(params, weight_decay).add_(grad)  # grad + λθ
        exp_avg = exp_avg.lerp_(grad, 1.0 - self.beta1) if donated else torch.lerp(exp_avg, grad, 1.0 - self.beta1)
        squares = torch.mul(grad, grad).mul_(1.0 - self.beta2)
        exp_avg_sq = (exp_avg_sq.mul_(self.beta2) if donated else torch.mul(exp_avg_sq, self.beta2)).add_(squares)
        work = torch.add(exp_avg_sq, self.eps_root * bias2) if self.eps_root else exp_avg_sq.clone()
        work.sqrt_().div_(math.sqrt(bias2)).add_(self.eps)  # the denominator
        torch.div(exp_avg, work, out=work).mul_(lr / bias1)
        return (params.sub_(work) if donated else torch.sub(params, work, out=work)), (exp_avg, exp_avg_sq)

    def update_vjp(
        self,
        grad: Tensor,
        params: Tensor,
        state: tuple[Tensor, ...],
        params_bar: Tensor,
        state_bar: tuple[Tensor, ...],
        *,
        step: int,
        lr: Scalar,
        weight_decay: Scalar = 0.0,
    ) -> UpdateVJP:
        r"""Closed-form VJP of :meth:`update`. With ``u = m'/D``, ``D = r/\sqrt{b_2} + ε``,
        ``r = \sqrt{v' + ε_{root} b_2}``:

        .. math::
            \bar u = -\tfrac{\eta}{b_1}\bar\theta',\
            \bar m'_{tot} = \bar m' + \bar u / D,\
            \bar v'_{tot} = \bar v' - \frac{\bar u\, m'}{D^2}\,\frac{1}{2 r\sqrt{b_2}},\
            \bar{\tilde g} = (1-\beta_1)\bar m'_{tot} + 2(1-\beta_2)\tilde g\,\bar v'_{tot},

        ``m̄ = β₁ m̄'_tot``, ``v̄ = β₂ v̄'_tot``, ``η̄ = -⟨θ̄', u⟩/b₁``, and the weight-decay terms
        of the coupled (Adam) or decoupled (AdamW) form.
        """
        lr, weight_decay = _value(lr), _value(weight_decay)
        exp_avg, exp_avg_sq = state
        bias1, bias2 = self._bias_corrections(step)
        decay = not _is_zero(weight_decay)
        if _without_graph(grad, params, *state, params_bar, *state_bar, lr, weight_decay):
            return self._update_vjp_in_place(grad, params, state, params_bar, state_bar, lr, weight_decay,
                                             bias1, bias2, decay)
        shrunk = params
        if decay:
            if self.decoupled:
                shrunk = params * (1.0 - lr * weight_decay)
            else:
                grad = grad + weight_decay * params
        new_avg = torch.lerp(exp_avg, grad, 1.0 - self.beta1)
        new_sq = self.beta2 * exp_avg_sq + (1.0 - self.beta2) * (grad * grad)
        root = torch.sqrt(new_sq + self.eps_root * bias2) if self.eps_root else torch.sqrt(new_sq)
        denom = root / math.sqrt(bias2) + self.eps
        ratio = new_avg / denom
        del shrunk  # θ' = shrunk - (η/b1)·ratio: only its derivative enters below
        ratio_bar = -(lr / bias1) * params_bar
        lr_bar = -(params_bar * ratio).sum() / bias1
        avg_bar = state_bar[0] + ratio_bar / denom
        sq_bar = state_bar[1] - (ratio_bar * ratio / denom) / (2.0 * math.sqrt(bias2) * root)
        grad_bar = (1.0 - self.beta1) * avg_bar + 2.0 * (1.0 - self.beta2) * grad * sq_bar
        moments_bar = (self.beta1 * avg_bar, self.beta2 * sq_bar)
        if not decay:
            return UpdateVJP(grad_bar, params_bar, moments_bar, lr_bar, torch.zeros_like(lr_bar))
        if self.decoupled:
            shrink_bar = -(params_bar * params).sum()  # ∂θ'/∂(ηλ) = -θ
            return UpdateVJP(
                grad_bar, params_bar * (1.0 - lr * weight_decay), moments_bar,
                lr_bar + weight_decay * shrink_bar, lr * shrink_bar,
            )
        return UpdateVJP(
            grad_bar, params_bar + weight_decay * grad_bar, moments_bar, lr_bar, (grad_bar * params).sum()
        )

    def _update_vjp_in_place(self, grad, params, state, params_bar, state_bar, lr, weight_decay, bias1, bias2,
                             decay):
        """:meth:`update_vjp`'s expressions, term for term (the same bits), in six parameter-sized
        buffers instead of about thirty fresh tensors: on a large model the VJP is memory-bound
        and each fresh buffer is also a round of page faults."""
        exp_avg, exp_avg_sq = state
        if decay and not self.decoupled:
            grad = grad + weight_decay * params
        a = torch.mul(grad, grad).mul_(1.0 - self.beta2)  # (1-β2)·g²
        b = torch.mul(exp_avg_sq, self.beta2).add_(a)  # v'
        root = torch.add(b, self.eps_root * bias2, out=a) if self.eps_root else a.copy_(b)
        root.sqrt_()  # r
        denom = torch.div(root, math.sqrt(bias2), out=b).add_(self.eps)  # D
        ratio = torch.lerp(exp_avg, grad, 1.0 - self.beta1).div_(denom)  # u = m'/D
        ratio_bar = torch.mul(params_bar, -(lr / bias1))  # ū
        lr_bar = -(params_bar * ratio).sum() / bias1
        avg_bar = torch.div(ratio_bar, denom).add_(state_bar[0])  # m̄'_tot
        sq_term = ratio_bar.mul_(ratio).div_(denom).div_(root.mul_(2.0 * math.sqrt(bias2)))
        sq_bar = torch.sub(state_bar[1], sq_term, out=sq_term)  # v̄'_tot
        grad_bar = torch.mul(avg_bar, 1.0 - self.beta1).add_(
            torch.mul(grad, 2.0 * (1.0 - self.beta2), out=root).mul_(sq_bar))
        moments_bar = (avg_bar.mul_(self.beta1), sq_bar.mul_(self.beta2))
        if not decay:
            return UpdateVJP(grad_bar, params_bar, moments_bar, lr_bar, torch.zeros_like(lr_bar))
        if self.decoupled:
            shrink_bar = -torch.mul(params_bar, params, out=denom).sum()
            return UpdateVJP(grad_bar, torch.mul(params_bar, 1.0 - lr * weight_decay, out=ratio), moments_bar,
                             lr_bar + weight_decay * shrink_bar, lr * shrink_bar)
        decay_bar = torch.mul(grad_bar, params, out=denom).sum()
        return UpdateVJP(grad_bar, torch.add(params_bar, torch.mul(grad_bar, weight_decay, out=ratio), out=ratio),
                         moments_bar, lr_bar, decay_bar)


Optimizer = Union[SGD, Adam]
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(
    name: str,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> Optimizer:
    """Build an optimizer by name (``sgd``, ``adam`` or ``adamw``)."""
    if name == "sgd":
        return SGD(momentum=momentum, nesterov=nesterov)
    if name in ("adam", "adamw"):
        return Adam(betas[0], betas[1], eps, eps_root, decoupled=name == "adamw")
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
