"""Model presets: small MLPs and CNNs for the built-in datasets.

Any ``nn.Module`` without buffers works with the training core; these presets only make the
command line convenient. Initialisation is seeded and leaves the global RNG untouched, so the
same seed gives the same initial parameters in every process.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mgd.errors import UserError

__all__ = ["MODELS", "ACTIVATIONS", "mlp", "cnn", "build_model"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
MODELS = ("mlp", "cnn")


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
) -> nn.Sequential:
    """A fully connected network: flatten, ``depth`` hidden layers of ``width``, linear head.

    The default on digits is the 64-128-128-10 tanh MLP of the benchmarks.
    """
    if width < 1 or depth < 0:
        raise UserError(f"MLP needs width >= 1 and depth >= 0, got width={width} depth={depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), _activation(activation)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 32,
    activation: str = "relu",
) -> nn.Sequential:
    """A small two-layer CNN with average pooling (smoother than max pooling).

    ``input_shape`` ``(L,)`` or ``(C, L)`` gives 1-d convolutions (mnist1d is ``(40,)``);
    ``(C, H, W)`` gives 2-d convolutions (digits is ``(1, 8, 8)``).
    """
    shape = tuple(input_shape)
    if len(shape) == 1:  # (L,): a one-channel sequence
        shape = (1, shape[0])
    if len(shape) == 2:  # (C, L)
        conv, pool, size, kernel = nn.Conv1d, nn.AdaptiveAvgPool1d, 4, 5
    elif len(shape) == 3:  # (C, H, W)
        conv, pool, size, kernel = nn.Conv2d, nn.AdaptiveAvgPool2d, 2, 3
    else:
        raise UserError(
            f"the CNN preset needs per-example shape (L,), (C, L) or (C, H, W), got {input_shape}"
        )
    channels = shape[0]
    pooled = size ** (len(shape) - 1)
    return nn.Sequential(
        nn.Unflatten(1, shape) if tuple(input_shape) != shape else nn.Identity(),
        conv(channels, width, kernel, padding=kernel // 2),
        _activation(activation),
        conv(width, width, kernel, padding=kernel // 2),
        _activation(activation),
        pool(size),
        nn.Flatten(),
        nn.Linear(width * pooled, num_classes),
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
