"""mgd: exact metagradients through whole training runs, and metagradient descent.

The core is functional: :class:`TrainingRun` (or :func:`make_run`; :class:`Trainer` for two
in-memory tensors) turns an ``nn.Module``, a per-example loss, data and an optimizer into a
pure step over an explicit :class:`TrainState`; metaparameters (:mod:`mgd.metaparams`)
are tensors that act on each step; :func:`metagradient` returns ``∂φ(θ_T)/∂z`` exactly, with
REPLAY's checkpoint tree keeping memory near ``k·log_k T`` states.
"""

from mgd._version import __version__
from mgd.check import directional_finite_difference, full_unroll_metagradient
from mgd.errors import ReplayDivergedError, UserError
from mgd.metaparams import (
    METAPARAMS,
    DataWeights,
    LRKnots,
    LRMultipliers,
    MetaParam,
    StepInputs,
    WeightDecay,
    register_metaparam,
)
from mgd.optim import SGD, Adam, make_optimizer
from mgd.replay import MetaGradient, ReplayPlan, ReplayTrace, metagradient
from mgd.losses import Metric, Objective
from mgd.step import TrainingRun, make_run
from mgd.task import Task
from mgd.training import Trainer, TrainState, accuracy, cross_entropy_objective
from mgd import batches, images, losses, schedules

__all__ = [
    "__version__",
    "Trainer",
    "TrainingRun",
    "make_run",
    "Task",
    "TrainState",
    "Objective",
    "Metric",
    "batches",
    "images",
    "losses",
    "schedules",
    "SGD",
    "Adam",
    "make_optimizer",
    "MetaParam",
    "StepInputs",
    "LRMultipliers",
    "LRKnots",
    "DataWeights",
    "WeightDecay",
    "METAPARAMS",
    "register_metaparam",
    "metagradient",
    "MetaGradient",
    "ReplayPlan",
    "ReplayTrace",
    "full_unroll_metagradient",
    "directional_finite_difference",
    "cross_entropy_objective",
    "accuracy",
    "UserError",
    "ReplayDivergedError",
]
