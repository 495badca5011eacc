"""Shared fixtures: a tiny digits problem, small enough for float64 checks in seconds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mgd
from mgd.data import load_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def digits_split(digits, n_train: int = 60, n_val: int = 40, dtype=torch.float64):
    """``((x, y), (x_val, y_val))``: the first ``n_train`` training and ``n_val`` validation digits."""
    x = torch.as_tensor(digits.x_train[:n_train], dtype=dtype)
    y = torch.as_tensor(digits.y_train[:n_train])
    xv = torch.as_tensor(digits.x_val[:n_val], dtype=dtype)
    yv = torch.as_tensor(digits.y_val[:n_val])
    return (x, y), (xv, yv)


def tiny_problem(
    digits,
    optimizer,
    *,
    steps: int = 13,
    n_train: int = 120,
    batch_size: int = 20,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    metaparams=("lr", "lr_knots", "data_weights", "weight_decay"),
    dtype=torch.float64,
    model: nn.Module | None = None,
    seed: int = 0,
):
    """A trainer and validation objective on the first ``n_train`` digits training images."""
    if model is None:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    model = model.to(dtype)
    x = torch.as_tensor(digits.x_train[:n_train], dtype=dtype)
    y = torch.as_tensor(digits.y_train[:n_train])
    xv = torch.as_tensor(digits.x_val[:100], dtype=dtype)
    yv = torch.as_tensor(digits.y_val[:100])
    trainer = mgd.Trainer(
        model, optimizer, x, y, steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed, metaparams=list(metaparams),
    )
    return trainer, mgd.cross_entropy_objective(model, xv, yv)


OPTIMIZERS = {
    "sgd-momentum": (lambda: mgd.SGD(momentum=0.9), 0.05),
    "sgd-nesterov": (lambda: mgd.SGD(momentum=0.9, nesterov=True), 0.05),
    "adam": (lambda: mgd.Adam(), 0.01),
    "adamw": (lambda: mgd.Adam(decoupled=True), 0.01),
}


def assert_cli_finite_differences(tmp_path, grads, train, sizes, key, h=1e-5, rtol=1e-6):
    """Central differences of whole ``mgd train`` runs at ``1 ± h·d`` against ``mgd grad``.

    ``train(flag, path, out)`` runs ``mgd train`` with a metaparameter file and returns its
    result directory; ``key`` is the value read from its ``result.json``; ``sizes`` maps
    ``(name, flag)`` to the metaparameter's length.
    """
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    for (name, flag), size in sizes.items():
        d = rng.standard_normal(size)
        d /= np.linalg.norm(d)
        values = []
        for sign in (+1, -1):
            path = tmp_path / f"{name}{sign}.npy"
            np.save(path, np.ones(size) + sign * h * d)
            out = train(flag, path, tmp_path / f"t{name}{sign}")
            values.append(json.loads((out / "result.json").read_text())[key])
        fd = (values[0] - values[1]) / (2 * h)
        exact = float(grads[name] @ d)
        assert abs(fd - exact) <= rtol * abs(exact), (name, fd, exact)
