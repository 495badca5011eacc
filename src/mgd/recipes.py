"""Training recipes: named sets of knob values applied on top of a base :class:`RunConfig`.

A recipe spec is ``NAME:knob=value,knob=value`` (``NAME`` alone is the base config). Knobs are
the fields of :class:`~mgd.config.RunConfig` that change how a model is trained, e.g.
``logit_scale=0.1``, ``norm=bn_before``, ``pooling=max``, ``width=256``, ``eps_root=1e-8``,
``lr=0.1``, ``warmup_steps=30``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mgd.config import RunConfig
from mgd.errors import UserError

__all__ = ["Recipe", "parse_recipe", "KNOBS", "DEFAULT_RECIPES"]

#: RunConfig fields a recipe may set (not the data, split, corruption or seed).
KNOBS = (
    "model", "width", "depth", "activation", "norm", "logit_scale", "pooling", "optimizer",
    "lr", "momentum", "nesterov", "weight_decay", "eps_root", "warmup_steps", "batch_size", "steps",
)

#: A menu that covers the knobs ``method.md`` §5 names (MLP presets).
DEFAULT_RECIPES = (
    "baseline",
    # logits / 10 shrinks gradients about 10x, so the learning rate goes up 10x with it
    "logits/10:logit_scale=0.1,lr=0.5",
    "bn-before:norm=bn_before",
    "bn-after:norm=bn_after",
    "bn-before+logits/10:norm=bn_before,logit_scale=0.1,lr=0.5",
    "wide:width=512",
    "warmup:warmup_steps=50",
    "lr-low:lr=0.01",
    "lr-high:lr=0.3",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    knobs: dict

    def apply(self, base: RunConfig) -> RunConfig:
        return RunConfig(**{**base.to_dict(), **self.knobs}).resolved()


def _convert(knob: str, text: str):
    types = {f.name: f.type for f in fields(RunConfig)}
    kind = str(types[knob])
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise UserError(f"knob {knob!r}: cannot read {text!r} as {kind.split('|')[0].strip()}") from None
    return text


def parse_recipe(spec: str) -> Recipe:
    """``"NAME:knob=value,..."`` → :class:`Recipe` (unknown knobs are a :class:`UserError`)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"recipe {spec!r} has no name; write NAME:knob=value,...")
    knobs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        knob, eq, value = item.partition("=")
        knob = knob.strip().replace("-", "_")
        if not eq:
            raise UserError(f"recipe {name!r}: expected knob=value, got {item!r}")
        if knob not in KNOBS:
            raise UserError(f"recipe {name!r}: unknown knob {knob!r}; knobs are {', '.join(KNOBS)}")
        knobs[knob] = _convert(knob, value.strip())
    return Recipe(name, knobs)
