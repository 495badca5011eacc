r"""Base learning-rate schedules: pure functions of ``(step, steps)``.

The training core sets :math:`\eta_t = \eta_\text{base}\, s(t, T)` for the 0-based step ``t`` of
``T`` steps, *before* any metaparameter (e.g. ``lr`` multipliers) acts. With ``w`` warm-up steps
and :math:`p_t = (t - w) / \max(1, T - w)`:

.. math::

    \text{warm-up } (t < w):\quad s_t = \min\!\left(1, \tfrac{t + 1}{w}\right)

    \text{cosine } (t \ge w):\quad s_t = f + (1 - f)\,\tfrac12\,(1 + \cos \pi p_t)

    \text{linear } (t \ge w):\quad s_t = f + (1 - f)\,(1 - p_t)

The decays follow ``transformers.get_cosine_schedule_with_warmup`` /
``get_linear_schedule_with_warmup`` for :math:`t \ge w` (they reach ``final`` at ``t = T``, one
step past the run). Warm-up differs on purpose: Hugging Face uses :math:`t / w`, so its first
step has learning rate 0; ours is HF's shifted one step left, :math:`s_t = s^\text{HF}_{t+1}`.

:class:`OneCycle` reproduces ``torch.optim.lr_scheduler.OneCycleLR`` (two phases) divided by the
base LR: with :math:`m` = ``max_multiplier``, :math:`a = m / d` (``div_factor``), :math:`b = a /
d_f` (``final_div_factor``) and :math:`e = \text{pct\_start}\cdot T - 1`, it anneals from ``a``
to ``m`` over :math:`t \in [0, e]`, then from ``m`` to ``b`` over :math:`[e, T - 1]`.

References:
    I. Loshchilov, F. Hutter. *SGDR: Stochastic Gradient Descent with Warm Restarts*. ICLR 2017.
    L. N. Smith, N. Topin. *Super-Convergence: Very Fast Training of Neural Networks Using Large
    Learning Rates*. 2017 (arXiv:1708.07120).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import ClassVar

from mgd.errors import UserError

__all__ = ["Schedule", "Constant", "LinearWarmup", "WarmupCosine", "WarmupLinear", "OneCycle",
           "constant", "linear_warmup", "warmup_cosine", "warmup_linear", "one_cycle",
           "SCHEDULES", "parse_schedule"]


@dataclass(frozen=True)
class Schedule:
    """A base-LR multiplier ``s(step, steps)``; subclasses define :meth:`_value`.

    ``str(schedule)`` is the :func:`parse_schedule` text that rebuilds it.
    """

    kind: ClassVar[str] = "schedule"

    def __call__(self, step: int, steps: int) -> float:
        """The base-LR multiplier.

        Args:
            step: the 0-based index of the optimizer step.
            steps: the number of steps in the run.

        Returns:
            A Python float.

        Raises:
            IndexError: ``step`` is outside ``[0, steps)``.
        """
        step, steps = operator.index(step), operator.index(steps)
        if not 0 <= step < steps:
            raise IndexError(f"{self.kind}: step {step} is outside [0, {steps})")
        return float(self._value(step, steps))

    def _value(self, t: int, steps: int) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-serialisable description: ``{"kind": ..., <fields>}``."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        args = ",".join(f"{f.name}={getattr(self, f.name)!r}".replace("'", "")
                        for f in dataclasses.fields(self))
        return f"{self.kind}:{args}" if args else self.kind

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"{self.kind}: {message}")

    def __post_init__(self) -> None:
        """Validate the warm-up/decay fields that a subclass has (``warmup_steps``, ``final``)."""
        w = getattr(self, "warmup_steps", 0)
        self._check(isinstance(w, int) and not isinstance(w, bool) and w >= 0,
                    f"warmup_steps must be an integer >= 0, got {w!r}; use 0 for no warm-up")
        if hasattr(self, "final"):
            f = self.final
            self._check(isinstance(f, (int, float)) and 0 <= f <= 1,
                        f"final must be in [0, 1] (a fraction of the base LR), got {f!r}")
            object.__setattr__(self, "final", float(f))


def _warmup(t: int, w: int) -> float:
    return min(1.0, (t + 1) / w) if w else 1.0


def _progress(t: int, steps: int, w: int) -> float:
    return (t - w) / max(1, steps - w)


@dataclass(frozen=True)
class Constant(Schedule):
    """:math:`s_t = 1`."""

    kind: ClassVar[str] = "constant"

    def _value(self, t: int, steps: int) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """:math:`s_t = \\min(1, (t+1)/w)`, then constant; ``warmup_steps=0`` is :class:`Constant`."""

    warmup_steps: int
    kind: ClassVar[str] = "linear_warmup"

    def _value(self, t: int, steps: int) -> float:
        return _warmup(t, self.warmup_steps)


@dataclass(frozen=True)
class WarmupCosine(Schedule):
    """Linear warm-up for ``warmup_steps`` steps, then cosine decay from 1 to ``final``."""

    warmup_steps: int
    final: float = 0.0
    kind: ClassVar[str] = "warmup_cosine"

    def _value(self, t: int, steps: int) -> float:
        if t < self.warmup_steps:
            return _warmup(t, self.warmup_steps)
        p = _progress(t, steps, self.warmup_steps)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class WarmupLinear(Schedule):
    """Linear warm-up for ``warmup_steps`` steps, then linear decay from 1 to ``final``."""

    warmup_steps: int
    final: float = 0.0
    kind: ClassVar[str] = "warmup_linear"

    def _value(self, t: int, steps: int) -> float:
        if t < self.warmup_steps:
            return _warmup(t, self.warmup_steps)
        return self.final + (1.0 - self.final) * (1.0 - _progress(t, steps, self.warmup_steps))


@dataclass(frozen=True)
class OneCycle(Schedule):
    """``OneCycleLR`` (``three_phase=False``) as a multiplier of the base LR.

    Where ``OneCycleLR`` would divide by zero (a first phase ending at step 0), we return the peak.
    """

    max_multiplier: float = 1.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    kind: ClassVar[str] = "one_cycle"

    def __post_init__(self) -> None:
        for name in ("max_multiplier", "div_factor", "final_div_factor"):
            v = getattr(self, name)
            self._check(isinstance(v, (int, float)) and v > 0, f"{name} must be > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        p = self.pct_start
        self._check(isinstance(p, (int, float)) and 0 < p < 1,
                    f"pct_start must be in (0, 1) (the fraction of steps spent rising), got {p!r}")
        object.__setattr__(self, "pct_start", float(p))
        self._check(self.anneal in ("cos", "linear"),
                    f"anneal must be 'cos' or 'linear', got {self.anneal!r}")

    def _value(self, t: int, steps: int) -> float:
        peak = self.max_multiplier
        start = peak / self.div_factor
        end_1 = float(self.pct_start * steps) - 1
        if t <= end_1:
            lo, hi, a, b = 0.0, end_1, start, peak
        else:
            lo, hi, a, b = end_1, float(steps - 1), peak, start / self.final_div_factor
        if hi == lo:
            return b
        pct = (t - lo) / (hi - lo)
        if self.anneal == "linear":
            return (b - a) * pct + a
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)


SCHEDULES: dict[str, type[Schedule]] = {
    c.kind: c for c in (Constant, LinearWarmup, WarmupCosine, WarmupLinear, OneCycle)}

# Factory spellings (the classes themselves, so signatures and docs stay in one place).
constant, linear_warmup, warmup_cosine, warmup_linear, one_cycle = SCHEDULES.values()

_ALIASES = {"warmup": "warmup_steps"}


def parse_schedule(text: str) -> Schedule:
    """Build a schedule from CLI text ``NAME[:KEY=VALUE,...]``.

    Example: ``"warmup_cosine:warmup=50,final=0.1"``. ``warmup`` abbreviates ``warmup_steps``.

    Raises:
        UserError: unknown name or key, a malformed or bad value, or a missing required key.
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(fields) or "none"
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        key = _ALIASES.get(key, key)
        if key not in fields or not eq:
            raise UserError(f"{name}: bad option {item!r}; give KEY=VALUE with KEY in: {valid}")
        convert = {"int": int, "float": float}.get(str(fields[key].type), str)
        try:
            kwargs[key] = convert(value)
        except ValueError:
            raise UserError(f"{name}: {key} must be a {convert.__name__}, got {value!r}") from None
    missing = [f for f, v in fields.items() if v.default is dataclasses.MISSING and f not in kwargs]
    if missing:
        raise UserError(f"{name}: missing {', '.join(missing)}; e.g. {name}:warmup=10")
    return cls(**kwargs)
