"""The short form of a training run: a classifier on two in-memory tensors.

:class:`Trainer` builds a :class:`~mgd.step.TrainingRun` from ``(x_train, y_train)`` with the
cross-entropy loss, which is what the built-in presets, the command line and the applications
use. Everything it can do is the run's (:mod:`mgd.step`); any other run (a user's loss, a
dict batch, a ``Dataset``, augmentation, LoRA, ...) is a :class:`~mgd.step.TrainingRun` or
:func:`~mgd.step.make_run` directly.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.errors import UserError
from mgd.losses import Objective
from mgd.metaparams import MetaParam
from mgd.optim import Optimizer
from mgd.step import TrainingRun, TrainState

__all__ = ["TrainState", "Trainer", "cross_entropy_objective", "accuracy"]


class Trainer(TrainingRun):
    """A classification run on in-memory tensors: ``model(x)``, per-example cross-entropy.

    Args:
        model: any ``nn.Module``; its current parameters and buffers are the initial ones.
        optimizer: an :mod:`mgd.optim` optimizer.
        x_train, y_train: the training set (features, integer labels), on the training device.
        steps, batch_size, lr, weight_decay, seed, warmup_steps, metaparams, collective: as
            for :class:`~mgd.step.TrainingRun`; further keyword arguments (``schedule``,
            ``clip_norm``, ``micro_batch``, ``trainable``, ``augment``, ``loss``) too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mgd import Trainer, SGD
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> trainer = Trainer(model, SGD(momentum=0.9), x, y, steps=5, batch_size=10, lr=0.1)
        >>> state = trainer.run()
        >>> state.step
        5
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        x_train: Tensor,
        y_train: Tensor,
        steps: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        seed: int = 0,
        metaparams: Mapping[str, MetaParam] | tuple | list = (),
        warmup_steps: int = 0,
        collective: Collective = SINGLE_PROCESS,
        **options,
    ):
        if len(y_train) != len(x_train):
            raise UserError(f"x_train has {len(x_train)} rows but y_train has {len(y_train)}")
        self.x_train, self.y_train = x_train, y_train
        super().__init__(
            model, optimizer, (x_train, y_train), steps=steps, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, seed=seed, metaparams=metaparams, warmup_steps=warmup_steps,
            collective=collective, **options,
        )
        if x_train.dtype != self.dtype:
            raise UserError(f"x_train is {x_train.dtype} but the model is {self.dtype}; convert one of them")


def cross_entropy_objective(model, x: Tensor, y: Tensor, *, batch_size: int | None = None) -> Objective:
    """``φ(θ)``: mean cross-entropy of ``model`` (eval mode) at the given tensors.

    ``model`` is the ``nn.Module`` (or a run's ``stateless`` model); ``θ`` a name → tensor
    dict, as :meth:`~mgd.step.TrainingRun.named_tensors` returns.
    """
    return Objective(model, (x, y), batch_size=batch_size)


@torch.no_grad()
def accuracy(run: TrainingRun, state: TrainState, x: Tensor, y: Tensor) -> float:
    """Fraction of ``(x, y)`` classified correctly at ``state`` (eval mode; not differentiated)."""
    return (run.predict(state.params, state.buffers, x).argmax(dim=1) == y).double().mean().item()
