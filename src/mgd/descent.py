r"""Metagradient descent (MGD): optimise metaparameters by gradient steps on whole training runs.

Each meta-step ``i`` (``method.md`` §6):

1. trains with metaparameters ``z_i`` and crafting seed ``s_i`` (seeds rotate across
   meta-steps, so ``z`` is not fitted to one initialisation and batch order),
2. computes the exact metagradient ``g_i = ∇_z φ`` of the validation objective by REPLAY,
3. takes a meta-optimizer step and projects: ``z_{i+1} = Π(z_i - step(g_i))`` (``+`` when
   maximising).

Every meta-step is recorded (validation objective, metagradient norm, time); the iterate
returned is the one with the best *validation* objective. Nothing here reads a test split.

Meta-optimizers are pure ``(init, update)`` pairs; projections are small callables that also
say up front when they cannot hold (:meth:`Projection.check`). The loop itself keeps no hidden
state: :class:`DescentState` is everything needed to continue, so a run directory can save it
after each meta-step and resume bit for bit (:mod:`mgd.runs`).

References:
    Engstrom et al., arXiv 2503.13751, Algorithm 1 (signed steps with a Bernoulli coordinate
    mask); Kingma & Ba, *Adam* (the Adam meta-optimizer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from mgd.errors import UserError
from mgd.replay import metagradient
from mgd.training import Trainer

__all__ = [
    "SignedStep",
    "MetaAdam",
    "Projection",
    "Box",
    "LInfBall",
    "NonNegative",
    "IntegerCounts",
    "FixedTotal",
    "Chain",
    "DescentState",
    "MetaStep",
    "descend",
    "state_to_arrays",
    "state_from_arrays",
]


# --------------------------------------------------------------------------- meta-optimizers


@dataclass(frozen=True)
class SignedStep:
    """``z ← z - α · sign(g) ⊙ m`` with an optional Bernoulli(p) coordinate mask ``m``.

    The paper's selection algorithm uses ``p = 0.2``. The mask is a pure function of
    ``(mask_seed, meta-step)``, so resumed runs draw the same masks.
    """

    step_size: float
    mask_prob: float = 1.0
    mask_seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise UserError(f"meta step size must be > 0, got {self.step_size}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise UserError(f"mask probability must be in (0, 1], got {self.mask_prob}")

    def init(self, z: Tensor) -> tuple[Tensor, ...]:
        return ()

    def update(self, grad: Tensor, z: Tensor, state: tuple[Tensor, ...], *, step: int, salt: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
        direction = torch.sign(grad)
        if self.mask_prob < 1.0:
            rng = np.random.default_rng([self.mask_seed, step, salt])
            mask = rng.random(tuple(z.shape)) < self.mask_prob
            direction = direction * torch.as_tensor(mask, dtype=z.dtype, device=z.device)
        return z - self.step_size * direction, ()


@dataclass(frozen=True)
class MetaAdam:
    """Adam on the metagradient (good for LR schedules, whose metagradients are tiny)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"meta learning rate must be > 0, got {self.lr}")

    def init(self, z: Tensor) -> tuple[Tensor, ...]:
        return (torch.zeros_like(z), torch.zeros_like(z))

    def update(self, grad: Tensor, z: Tensor, state: tuple[Tensor, ...], *, step: int, salt: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
        m, v = state
        m = self.beta1 * m + (1 - self.beta1) * grad
        v = self.beta2 * v + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1 ** (step + 1))
        v_hat = v / (1 - self.beta2 ** (step + 1))
        return z - self.lr * m_hat / (torch.sqrt(v_hat) + self.eps), (m, v)


# --------------------------------------------------------------------------- projections


class Projection(Protocol):
    def __call__(self, z: Tensor) -> Tensor:
        """The feasible point to use for ``z``."""

    def check(self, z0: Tensor) -> None:
        """Raise :class:`UserError` if no feasible point exists for values shaped like ``z0``."""


@dataclass(frozen=True)
class Box:
    """Clamp to ``[lo, hi]`` (either may be ``None``)."""

    lo: float | None = None
    hi: float | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return z.clamp(min=self.lo, max=self.hi)

    def check(self, z0: Tensor) -> None:
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise UserError(f"empty box: lower bound {self.lo} > upper bound {self.hi}")


@dataclass(frozen=True)
class NonNegative(Box):
    """``z ≥ 0``."""

    lo: float | None = 0.0


@dataclass(frozen=True)
class LInfBall:
    """``‖z - anchor‖_∞ ≤ radius``."""

    anchor: Tensor
    radius: float

    def __call__(self, z: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(z, self.anchor + self.radius), self.anchor - self.radius)

    def check(self, z0: Tensor) -> None:
        if not self.radius >= 0:
            raise UserError(f"L-infinity radius must be >= 0, got {self.radius}")
        if self.anchor.shape != z0.shape:
            raise UserError(f"L-infinity anchor has shape {tuple(self.anchor.shape)}, values {tuple(z0.shape)}")


@dataclass(frozen=True)
class IntegerCounts:
    """Non-negative integers (counts of copies of each example; 0 drops it)."""

    def __call__(self, z: Tensor) -> Tensor:
        return torch.round(z).clamp(min=0)

    def check(self, z0: Tensor) -> None:
        pass


@dataclass(frozen=True)
class FixedTotal:
    """``z ≥ 0`` with ``Σ z = total`` (and ``z ≤ upper`` if given): Euclidean projection.

    For counts (``integer=True``) the continuous projection is rounded by largest remainders,
    which keeps the total exact.
    """

    total: float
    upper: float | None = None
    integer: bool = False

    def check(self, z0: Tensor) -> None:
        n = z0.numel()
        if not self.total >= 0:
            raise UserError(f"the budget must be >= 0, got {self.total}")
        if self.upper is not None and self.total > self.upper * n:
            raise UserError(
                f"a budget of {self.total:g} cannot be met with {n} entries of at most "
                f"{self.upper:g} each (at most {self.upper * n:g}); lower the budget"
            )

    def __call__(self, z: Tensor) -> Tensor:
        flat = z.reshape(-1).double()
        hi = math.inf if self.upper is None else self.upper
        # Find τ with Σ clamp(z - τ, 0, hi) = total by bisection: exact enough in float64
        # and simple; the function is monotone in τ.
        # At τ = min(z) - total/n every entry is at least total/n (or at its upper bound).
        lo_tau, hi_tau = float(flat.min()) - self.total / flat.numel() - 1.0, float(flat.max())
        for _ in range(100):
            tau = 0.5 * (lo_tau + hi_tau)
            if float((flat - tau).clamp(0, hi).sum()) > self.total:
                lo_tau = tau
            else:
                hi_tau = tau
        projected = (flat - hi_tau).clamp(0, hi)
        if self.integer:
            projected = _round_to_total(projected, int(round(self.total)), hi)
        else:  # remove the bisection's last rounding error from the sum
            slack = self.total - float(projected.sum())
            free = (projected > 0) & (projected < hi)
            if free.any():
                projected[free] += slack / int(free.sum())
        return projected.to(z.dtype).reshape(z.shape)


def _round_to_total(values: Tensor, total: int, upper: float) -> Tensor:
    floors = torch.floor(values)
    missing = total - int(floors.sum())
    remainders = values - floors
    remainders[floors >= upper] = -1.0  # cannot grow further
    if missing > 0:
        floors[torch.topk(remainders, missing).indices] += 1
    return floors


@dataclass(frozen=True)
class Chain:
    """Apply several projections in order."""

    projections: tuple

    def __call__(self, z: Tensor) -> Tensor:
        for p in self.projections:
            z = p(z)
        return z

    def check(self, z0: Tensor) -> None:
        for p in self.projections:
            p.check(z0)


# --------------------------------------------------------------------------- the loop


@dataclass
class DescentState:
    """Everything needed to continue MGD: the next meta-step, iterate, optimizer state, best."""

    step: int
    z: dict[str, Tensor]
    opt_state: dict[str, tuple[Tensor, ...]]
    best_step: int = -1
    best_value: float = math.nan
    best_z: dict[str, Tensor] = field(default_factory=dict)


def state_to_arrays(state: DescentState) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, metadata)`` for saving a :class:`DescentState` without pickling."""
    arrays = {}
    for name, value in state.z.items():
        arrays[f"z/{name}"] = value.detach().cpu().numpy()
        for j, tensor in enumerate(state.opt_state[name]):
            arrays[f"opt/{name}/{j}"] = tensor.detach().cpu().numpy()
    for name, value in state.best_z.items():
        arrays[f"best/{name}"] = value.detach().cpu().numpy()
    meta = {
        "step": state.step,
        "best_step": state.best_step,
        "best_value": state.best_value,
        "names": list(state.z),
        "opt_sizes": {name: len(state.opt_state[name]) for name in state.z},
    }
    return arrays, meta


def state_from_arrays(
    arrays: Mapping[str, np.ndarray], meta: Mapping, *, like: Mapping[str, Tensor]
) -> DescentState:
    """Inverse of :func:`state_to_arrays`; tensors take the dtype and device of ``like``."""
    try:
        names = list(meta["names"])
        if sorted(names) != sorted(like):
            raise UserError(f"saved state optimises {names}, this run {list(like)}")

        def tensor(key: str, name: str) -> Tensor:
            return torch.as_tensor(arrays[key]).to(dtype=like[name].dtype, device=like[name].device)

        return DescentState(
            step=int(meta["step"]),
            z={name: tensor(f"z/{name}", name) for name in names},
            opt_state={
                name: tuple(tensor(f"opt/{name}/{j}", name) for j in range(int(meta["opt_sizes"][name])))
                for name in names
            },
            best_step=int(meta["best_step"]),
            best_value=float(meta["best_value"]),
            best_z={name: tensor(f"best/{name}", name) for name in names if f"best/{name}" in arrays},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the saved MGD state is incomplete or corrupt ({exc!r}); start a new run") from None


@dataclass(frozen=True)
class MetaStep:
    """One meta-step's record: the validation objective at ``z_step`` and what was done."""

    step: int
    seed: int
    value: float
    grad_norms: dict[str, float]
    seconds: float
    extra: dict = field(default_factory=dict)
    iterate: dict[str, Tensor] = field(default_factory=dict, repr=False)  # z_step itself

    def to_dict(self) -> dict:
        """The JSON-able part (the iterate is saved separately as arrays)."""
        return {
            "step": self.step,
            "seed": self.seed,
            "val_objective": self.value,
            "metagrad_norms": self.grad_norms,
            "seconds": self.seconds,
            **self.extra,
        }


def descend(
    make_trainer: Callable[[int], tuple[Trainer, Callable]],
    z0: Mapping[str, Tensor],
    *,
    fixed: Mapping[str, Tensor] | None = None,
    optimizer: SignedStep | MetaAdam,
    projections: Mapping[str, Projection] | None = None,
    steps: int,
    seeds: Sequence[int],
    maximize: bool = False,
    k: int | None = None,
    horizon: int | None = None,
    seeds_per_step: int = 1,
    gradient_from: Mapping[str, str] | None = None,
    state: DescentState | None = None,
    on_step: Callable[[MetaStep, DescentState], None] | None = None,
    diagnostics: Callable[[Mapping[str, Tensor]], dict] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> DescentState:
    """Run (or continue) metagradient descent on the metaparameters in ``z0``.

    Args:
        make_trainer: ``seed -> (trainer, objective)``; called with the crafting seed of
            each meta-step (the same seed must give the same run).
        z0: starting values of the metaparameters to optimise.
        fixed: values of other metaparameters of the run, held constant (default: neutral).
        optimizer: :class:`SignedStep` or :class:`MetaAdam`.
        projections: per metaparameter, applied after every step (and to ``z0``).
        steps: meta-steps. Meta-step ``i`` evaluates and differentiates at ``z_i``; after the
            last update one more training run evaluates the final iterate.
        seeds: crafting seeds, used round-robin.
        seeds_per_step: average the objective and the metagradient over this many
            consecutive crafting seeds at each meta-step (a lower-variance estimate of the
            expected metagradient, at that many times the cost; ``1``: one seed per step).
        gradient_from: step ``z[name]`` along the metagradient of another metaparameter of
            the run, ``{name: other}``, held at its value in ``fixed`` (e.g. MGD selection's
            counts along :class:`~mgd.metaparams.PoolInjection`'s surrogate). Default: each
            metaparameter along its own metagradient.
        maximize: ascend instead of descend (e.g. poisoning).
        k: REPLAY branching factor.
        horizon: truncate each metagradient to the last ``horizon`` steps (an ablation; see
            :func:`mgd.replay.metagradient`).
        state: a saved :class:`DescentState` to continue from.
        on_step: called after every meta-step with its record and the new state (save here).
        diagnostics: optional ``z -> dict`` added to each record (must not read test data).
        progress: optional progress callback ``("meta", 1)``.

    Returns:
        The final :class:`DescentState`; ``best_z`` is the iterate with the best validation
        objective among all evaluated.
    """
    if steps < 0:
        raise UserError(f"meta-steps must be >= 0, got {steps}")
    if not seeds:
        raise UserError("need at least one crafting seed")
    if not 1 <= seeds_per_step <= len(seeds):
        raise UserError(f"seeds per meta-step must be between 1 and the {len(seeds)} crafting seeds, got {seeds_per_step}")
    projections = dict(projections or {})
    fixed = dict(fixed or {})
    source = {name: name for name in z0}
    for name, other in (gradient_from or {}).items():
        if name not in z0:
            raise UserError(f"gradient_from names {name!r}, which is not being optimised")
        if other in z0:
            raise UserError(f"{name!r} cannot follow the gradient of {other!r}, which is optimised itself")
        source[name] = other
    for name, projection in projections.items():
        if name not in z0:
            raise UserError(f"projection given for {name!r}, which is not being optimised")
        projection.check(z0[name])
    if state is None:
        z = {name: projections[name](v) if name in projections else v.clone() for name, v in z0.items()}
        state = DescentState(0, z, {name: optimizer.init(v) for name, v in z.items()})
    sign = -1.0 if maximize else 1.0
    better = (lambda a, b: a > b) if maximize else (lambda a, b: a < b)

    while state.step <= steps:
        i = state.step
        step_seeds = [seeds[(i * seeds_per_step + j) % len(seeds)] for j in range(seeds_per_step)]
        started = time.perf_counter()
        values, grads = [], {}
        for seed in step_seeds:
            trainer, objective = make_trainer(seed)
            if i < steps:
                result = metagradient(
                    trainer, objective, {**fixed, **state.z}, wrt=list(dict.fromkeys(source.values())), k=k,
                    horizon=horizon,
                )
                values.append(result.value)
                for name in state.z:
                    g = result.grads[source[name]]
                    grads[name] = g if name not in grads else grads[name] + g
            else:  # the final iterate is only evaluated
                final = trainer.run({**fixed, **state.z})
                with torch.no_grad():
                    values.append(float(objective(trainer.named_tensors(final.params, final.buffers))))
        value = sum(values) / len(values)
        grads = {name: g / len(step_seeds) for name, g in grads.items()}
        seed = step_seeds[0]
        if not math.isfinite(value):
            raise UserError(
                f"the validation objective became {value} at meta-step {i}; lower the meta step size"
            )
        if state.best_step < 0 or better(value, state.best_value):
            state.best_step, state.best_value = i, value
            state.best_z = {name: v.clone() for name, v in state.z.items()}
        z_next, opt_next = {}, {}
        for salt, (name, v) in enumerate(state.z.items()):
            if i < steps:
                stepped, opt_next[name] = optimizer.update(
                    sign * grads[name], v, state.opt_state[name], step=i, salt=salt
                )
                z_next[name] = projections[name](stepped) if name in projections else stepped
            else:
                z_next[name], opt_next[name] = v, state.opt_state[name]
        record = MetaStep(
            step=i,
            seed=seed,
            value=value,
            grad_norms={name: float(g.norm()) for name, g in grads.items()},
            seconds=time.perf_counter() - started,
            extra=diagnostics(state.z) if diagnostics else {},
            iterate=state.z,
        )
        state = DescentState(i + 1, z_next, opt_next, state.best_step, state.best_value, state.best_z)
        if on_step is not None:
            on_step(record, state)
        if progress is not None:
            progress("meta", 1)
    return state
