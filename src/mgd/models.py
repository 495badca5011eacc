"""Model presets: small MLPs and CNNs for the built-in datasets, with metasmoothness knobs.

Any ``nn.Module`` whose only buffers are BatchNorm statistics works with the training core;
these presets make the command line convenient and expose the design choices that
``method.md`` §5 says change metasmoothness:

* ``norm``: ``"none"``, ``"bn_before"`` (BatchNorm before the activation, the paper's
  metasmooth choice) or ``"bn_after"`` (after it);
* ``logit_scale``: multiply the final-layer output by a constant (the paper divides logits by
  10, i.e. ``logit_scale=0.1``);
* ``pooling`` (CNN): ``"avg"`` (smoother) or ``"max"``;
* ``width`` and ``activation``.

Initialisation is seeded and leaves the global RNG untouched, so the same seed gives the same
initial parameters in every process.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mgd.errors import UserError

__all__ = ["MODELS", "ACTIVATIONS", "NORMS", "POOLINGS", "Scale", "mlp", "cnn", "build_model"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
MODELS = ("mlp", "cnn")
NORMS = ("none", "bn_before", "bn_after")
POOLINGS = ("avg", "max")


class Scale(nn.Module):
    """Multiply by a fixed constant (logit scaling; no parameters, no buffers)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {label} {value!r}; choose one of {', '.join(choices)}")


def _block(layer: nn.Module, features: int, activation: str, norm: str, dims: int) -> list[nn.Module]:
    """``layer``, then activation and optional BatchNorm in the order ``norm`` asks for."""
    _check_choice("norm", norm, NORMS)
    batchnorm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    if norm == "bn_before":
        return [layer, batchnorm(features), _activation(activation)]
    if norm == "bn_after":
        return [layer, _activation(activation), batchnorm(features)]
    return [layer, _activation(activation)]


def _head(features: int, num_classes: int, logit_scale: float) -> list[nn.Module]:
    if not logit_scale > 0:
        raise UserError(f"logit scale must be > 0, got {logit_scale}")
    head: list[nn.Module] = [nn.Linear(features, num_classes)]
    return head + ([Scale(logit_scale)] if logit_scale != 1.0 else [])


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise UserError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 128,
    depth: int = 2,
    activation: str = "tanh",
    norm: str = "none",
    logit_scale: float = 1.0,
) -> nn.Sequential:
    """A fully connected network: flatten, ``depth`` hidden layers of ``width``, linear head.

    The default on digits is the 64-128-128-10 tanh MLP of the benchmarks.
    """
    if width < 1 or depth < 0:
        raise UserError(f"MLP needs width >= 1 and depth >= 0, got width={width} depth={depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += _block(nn.Linear(features, width), width, activation, norm, dims=1)
        features = width
    return nn.Sequential(*layers, *_head(features, num_classes, logit_scale))


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 32,
    activation: str = "relu",
    norm: str = "none",
    pooling: str = "avg",
    logit_scale: float = 1.0,
) -> nn.Sequential:
    """A small two-layer CNN; average pooling (the default) is smoother than max pooling.

    ``input_shape`` ``(L,)`` or ``(C, L)`` gives 1-d convolutions (mnist1d is ``(40,)``);
    ``(C, H, W)`` gives 2-d convolutions (digits is ``(1, 8, 8)``).
    """
    shape = tuple(input_shape)
    if len(shape) == 1:  # (L,): a one-channel sequence
        shape = (1, shape[0])
    _check_choice("pooling", pooling, POOLINGS)
    if len(shape) == 2:  # (C, L)
        conv, size, kernel = nn.Conv1d, 4, 5
        pool = nn.AdaptiveAvgPool1d if pooling == "avg" else nn.AdaptiveMaxPool1d
    elif len(shape) == 3:  # (C, H, W)
        conv, size, kernel = nn.Conv2d, 2, 3
        pool = nn.AdaptiveAvgPool2d if pooling == "avg" else nn.AdaptiveMaxPool2d
    else:
        raise UserError(
            f"the CNN preset needs per-example shape (L,), (C, L) or (C, H, W), got {input_shape}"
        )
    channels = shape[0]
    dims = len(shape) - 1
    return nn.Sequential(
        nn.Unflatten(1, shape) if tuple(input_shape) != shape else nn.Identity(),
        *_block(conv(channels, width, kernel, padding=kernel // 2), width, activation, norm, dims),
        *_block(conv(width, width, kernel, padding=kernel // 2), width, activation, norm, dims),
        pool(size),
        nn.Flatten(),
        *_head(width * size**dims, num_classes, logit_scale),
    )


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    **options,
) -> nn.Module:
    """Build a preset with parameters initialised from ``seed`` (global RNG untouched)."""
    builders = {"mlp": mlp, "cnn": cnn}
    if name not in builders:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builders[name](tuple(input_shape), num_classes, **options)
    return model.to(dtype)
