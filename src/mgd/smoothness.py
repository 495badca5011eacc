r"""Metasmoothness: is ``z ↦ f(z)`` smooth enough for metagradients to be useful?

Both measures of ``method.md`` §5 come from three deterministic training runs, at ``z``,
``z + h v`` and ``z + 2 h v``, and need no metagradient:

* **curvature along a direction** (Definition 1; lower is smoother),

  .. math:: S_{h,v}(f; z) = \frac{|f(z + 2hv) - 2 f(z + hv) + f(z)|}{h^2};

* **empirical metasmoothness in parameter space** (Definition 2; higher is smoother, in
  ``[-1, 1]``): with ``θ_0, θ_h, θ_{2h}`` the trained parameters,
  ``Δ_1 = (θ_h - θ_0)/h``, ``Δ_2 = (θ_{2h} - θ_h)/h`` and ``d = |θ_{2h} - θ_0|``,

  .. math:: \hat S_{h,v}(A; z) = \operatorname{sign}(\Delta_1)^\top
            \operatorname{diag}\!\Big(\frac{d}{\|d\|_1}\Big)\operatorname{sign}(\Delta_2),

  the movement-weighted share of coordinates whose finite-difference direction does not
  flip. It is defined as 1 when nothing moves.

Scores are averaged over several random directions ``v ~ N(0, I)`` (fixed seeds, so every
recipe is probed along the same directions).

References:
    Engstrom et al., arXiv 2503.13751, §3 (Definitions 1 and 2, Fig. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = ["curvature", "sign_agreement", "Probe", "SmoothnessReport", "probe", "metasmoothness", "trainer_probe_fn"]

#: ``train(z) -> (final parameter vector, objective value)``: one deterministic training run.
TrainFn = Callable[[Mapping[str, Tensor]], "tuple[Tensor, float]"]


def curvature(f0: float, fh: float, f2h: float, h: float) -> float:
    """``S = |f(z+2hv) - 2 f(z+hv) + f(z)| / h²``."""
    return abs(f2h - 2.0 * fh + f0) / (h * h)


def sign_agreement(theta0: Tensor, theta_h: Tensor, theta_2h: Tensor, h: float) -> float:
    """``Ŝ``: movement-weighted agreement of consecutive finite-difference signs (1 if static)."""
    delta1 = (theta_h - theta0) / h
    delta2 = (theta_2h - theta_h) / h
    moved = (theta_2h - theta0).abs().double()
    total = moved.sum()
    if total == 0:
        return 1.0
    agreement = (torch.sign(delta1) * torch.sign(delta2)).double()
    return float((agreement * moved).sum() / total)


@dataclass(frozen=True)
class Probe:
    """One direction: the three objective values and both scores."""

    values: tuple[float, float, float]
    curvature: float
    sign_agreement: float


@dataclass(frozen=True)
class SmoothnessReport:
    """Scores over several directions: means, standard errors and every probe."""

    h: float
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    @property
    def curvature(self) -> float:
        return sum(p.curvature for p in self.probes) / len(self.probes)

    @property
    def sign_agreement(self) -> float:
        return sum(p.sign_agreement for p in self.probes) / len(self.probes)

    def stderr(self, name: str) -> float:
        values = [getattr(p, name) for p in self.probes]
        if len(values) < 2:
            return float("nan")
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    def to_dict(self) -> dict:
        return {
            "h": self.h,
            "curvature": self.curvature,
            "curvature_se": self.stderr("curvature"),
            "sign_agreement": self.sign_agreement,
            "sign_agreement_se": self.stderr("sign_agreement"),
            "probes": [
                {"values": list(p.values), "curvature": p.curvature, "sign_agreement": p.sign_agreement}
                for p in self.probes
            ],
        }


def probe(
    train: TrainFn,
    z: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    h: float,
    *,
    base: "tuple[Tensor, float] | None" = None,
) -> Probe:
    """Both scores along one direction; ``base`` reuses an existing run at ``z``."""
    if not h > 0:
        raise UserError(f"the smoothness step h must be > 0, got {h}")

    def at(scale: float) -> "tuple[Tensor, float]":
        return train({name: v + scale * h * direction[name] if name in direction else v for name, v in z.items()})

    theta0, f0 = base if base is not None else at(0.0)
    theta_h, fh = at(1.0)
    theta_2h, f2h = at(2.0)
    return Probe((f0, fh, f2h), curvature(f0, fh, f2h, h), sign_agreement(theta0, theta_h, theta_2h, h))


def metasmoothness(
    train: TrainFn,
    z: Mapping[str, Tensor],
    name: str,
    *,
    directions: int = 4,
    h: float = 0.05,
    seed: int = 0,
) -> SmoothnessReport:
    """Average both scores over ``directions`` Gaussian directions in metaparameter ``name``.

    Costs ``1 + 2 · directions`` training runs (the run at ``z`` is shared).
    """
    if directions < 1:
        raise UserError(f"need at least one direction, got {directions}")
    if name not in z:
        raise UserError(f"no metaparameter {name!r} to probe; have {', '.join(z)}")
    base = train(z)
    probes = []
    for j in range(directions):
        generator = torch.Generator().manual_seed(seed * 100_003 + j)
        v = torch.randn(z[name].shape, generator=generator, dtype=torch.float64)
        probes.append(probe(train, z, {name: v.to(z[name])}, h, base=base))
    return SmoothnessReport(h, tuple(probes))


def trainer_probe_fn(trainer, objective) -> TrainFn:
    """A :data:`TrainFn` from a :class:`~mgd.training.Trainer` and an objective."""

    def train(z: Mapping[str, Tensor]) -> "tuple[Tensor, float]":
        final = trainer.run(z)
        with torch.no_grad():
            value = float(objective(trainer.named_tensors(final.params, final.buffers)))
        return final.params, value

    return train
