"""Flags shared by the subcommands, and turning them into a :class:`~mgd.config.RunConfig`."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from mgd.config import DTYPES, RunConfig
from mgd.errors import UserError
from mgd.models import ACTIVATIONS, MODELS, NORMS, POOLINGS
from mgd.optim import OPTIMIZERS


def _number(cast, description: str, accept):
    """An argparse type: ``cast`` the text and require ``accept(value)`` (NaN never passes)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
non_negative_float = _number(float, "a number >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: 0 < v < float("inf"))
replay_k = _number(int, "an integer >= 2 (k = 2 uses the least memory)", lambda v: v >= 2)


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` or a range ``"100-109"`` → a list of distinct integers."""
    try:
        if "-" in text.strip().lstrip("-") and "," not in text:
            first, last = (int(part) for part in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2 or 100-109, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


_GIVEN = "_given_flags"


def _recording(base: type) -> type:
    """``base`` (an argparse action class) that also notes on the namespace that it ran."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, _GIVEN, getattr(namespace, _GIVEN, frozenset()) | {self.dest})

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


_RECORDING_STORE = _recording(argparse._StoreAction)
_RECORDING_ACTIONS = {None: _RECORDING_STORE, "store": _RECORDING_STORE,
                      "store_true": _recording(argparse._StoreTrueAction)}


def track_given_flags(parser: argparse.ArgumentParser) -> None:
    """Make the flags added to ``parser`` from now on remember being given (:func:`given_flags`).

    A flag given with its default value counts as given; one left out does not.
    """
    for name, action in _RECORDING_ACTIONS.items():
        parser.register("action", name, action)


def given_flags(args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the flags given on the command line (see :func:`track_given_flags`)."""
    return getattr(args, _GIVEN, frozenset())


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that define a training run (one per :class:`RunConfig` field)."""
    defaults = RunConfig()
    g = parser.add_argument_group("training run")
    g.add_argument("--dataset", default=defaults.dataset,
                   help="digits, mnist1d, or a path to an .npz with x_train, y_train, x_val, y_val, "
                        "x_test, y_test (default: %(default)s)")
    g.add_argument("--model", choices=MODELS, default=defaults.model, help="model preset (default: %(default)s)")
    g.add_argument("--width", type=positive_int, help="hidden width / channels (default: 128 MLP, 32 CNN)")
    g.add_argument("--depth", type=int, default=defaults.depth, help="MLP hidden layers (default: %(default)s)")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), help="default: tanh (MLP), relu (CNN)")
    g.add_argument("--norm", choices=NORMS, default=defaults.norm,
                   help="BatchNorm before or after each activation, or none (default: %(default)s)")
    g.add_argument("--logit-scale", type=positive_float, default=defaults.logit_scale,
                   help="multiply the logits by this (0.1 = logits / 10) (default: %(default)s)")
    g.add_argument("--pooling", choices=POOLINGS, default=defaults.pooling, help="CNN pooling (default: %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help="(default: %(default)s)")
    g.add_argument("--lr", type=positive_float, help="base learning rate (default: 0.05 SGD, 1e-3 Adam/AdamW)")
    g.add_argument("--momentum", type=non_negative_float, default=defaults.momentum,
                   help="SGD momentum (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    g.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                   help="weight decay: coupled for SGD and Adam, decoupled for AdamW (default: %(default)s)")
    g.add_argument("--eps-root", type=non_negative_float, default=defaults.eps_root,
                   help="Adam epsilon inside the square root; keep > 0 to differentiate through Adam "
                        "(default: %(default)s)")
    g.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps T (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="(default: %(default)s)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=defaults.warmup_steps,
                   help="linear LR warm-up over this many steps (default: %(default)s)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and batch-order seed (default: %(default)s)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype, help="(default: %(default)s)")
    g.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads; replays and reruns must use the same value (default: %(default)s)")
    c = parser.add_argument_group("pool corruption (experiments; the ground truth is used for diagnostics only)")
    c.add_argument("--label-noise", type=non_negative_float, default=defaults.label_noise,
                   help="fraction of training labels replaced by a wrong label (default: %(default)s)")
    c.add_argument("--noise-seed", type=int, default=defaults.noise_seed, help="(default: %(default)s)")
    m = parser.add_argument_group("metaparameter values (.npy files; default: neutral values)")
    m.add_argument("--lr-multipliers", metavar="FILE.npy", help="per-step LR multipliers, length --steps (default: ones)")
    m.add_argument("--lr-knots", metavar="FILE.npy", help="log-LR multiplier knots (default: --num-knots zeros)")
    m.add_argument("--num-knots", type=positive_int, default=defaults.num_knots,
                   help="number of log-LR knots (default: %(default)s)")
    m.add_argument("--data-weights", metavar="FILE.npy", help="per-example loss weights, one per training example (default: ones)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {name: getattr(args, name) for name in RunConfig.field_names() if hasattr(args, name)}
    if getattr(args, "depth", 0) is not None and args.depth < 0:
        raise UserError(f"--depth must be >= 0, got {args.depth}")
    return RunConfig(**values).resolved()


def meta_files(args: argparse.Namespace) -> dict[str, str | None]:
    """Metaparameter name → file given on the command line (or ``None``)."""
    return {"lr": args.lr_multipliers, "lr_knots": args.lr_knots, "data_weights": args.data_weights}


def configure_torch(args: argparse.Namespace) -> None:
    """Fix what bit-exact replay depends on: thread counts and, on GPUs, deterministic kernels."""
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        # Must be set before CUDA initialises (cuBLAS reads it once).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def add_distributed_flags(parser) -> None:
    """``--dist-timeout``: how long a rank waits for the others (under ``torchrun``)."""
    parser.add_argument("--dist-timeout", type=positive_float, default=300.0, metavar="SECONDS",
                        help="under torchrun: seconds a collective may wait for the other ranks before "
                             "this rank stops with an error (default: %(default)s)")


def collective_from_args(args: argparse.Namespace):
    """The data-parallel group of this process (one process unless launched by torchrun)."""
    from mgd.distributed import from_environment

    return from_environment(args.device, args.dist_timeout)


def add_replay_k_flag(parser) -> None:
    parser.add_argument("--replay-k", type=replay_k, metavar="K",
                        help="REPLAY tree branching factor >= 2 (default: the lean two-level tree, "
                             "about sqrt(steps))")


def memory_size(text: str) -> int:
    """An argparse type for ``--memory-budget`` (``500MB``, ``2GB``, bytes)."""
    from mgd.memory import parse_memory_size

    try:
        return parse_memory_size(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_plan_flags(parser) -> None:
    """``--replay-k``, ``--memory-budget``, the checkpoint tiers and ``--vjp``: how the reverse
    pass is planned and where it keeps its checkpoints."""
    from mgd.replay import VJP_MODES

    add_replay_k_flag(parser)
    parser.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                        help="memory the reverse pass may keep (states and kept graphs), e.g. 500MB: "
                             "the fastest plan that fits (every state stored if it fits). Default: the "
                             "lean two-level tree (one extra training run), capped at half the available RAM")
    parser.add_argument("--host-budget", type=memory_size, metavar="SIZE",
                        help="host memory for checkpoints when --memory-budget is too small for the lean "
                             "tree: the forward pass's checkpoints move there (pinned on a GPU) before "
                             "the tree gets deeper (default: not used)")
    parser.add_argument("--disk-budget", type=memory_size, metavar="SIZE",
                        help="disk space for checkpoints beyond --host-budget, written in the background "
                             "and prefetched (default: not used)")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="where the disk tier makes its private folder, removed at the end "
                             "(default: the system's temporary directory)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the disk tier's folder (raw tensors and layout.json) after the pass")
    parser.add_argument("--vjp", choices=VJP_MODES, default="fused",
                        help="per-step VJP: fused (double-backward on the graph the replay kept; "
                             "fastest on CPU), double-backward (recompute each step), mixed "
                             "(forward-over-reverse; least memory) (default: %(default)s)")


def add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def add_run_dir_flags(
    parser: argparse.ArgumentParser, default_out: str, resume_help: str = "continue the run in DIR"
) -> None:
    """``--out`` (a new run directory), ``--resume DIR`` and ``--quiet``, for long commands."""
    parser.add_argument("--out", default=default_out, help="new run directory (default: %(default)s)")
    parser.add_argument("--resume", metavar="DIR", help=resume_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def add_eval_workers_flag(parser: argparse.ArgumentParser) -> None:
    """``--eval-workers``: processes for the final retraining runs (results are identical)."""
    parser.add_argument("--eval-workers", type=positive_int, default=1, metavar="N",
                        help="retrain the evaluation seeds in N processes, each with --threads threads; "
                             "the numbers are identical to N = 1 (default: %(default)s)")


@contextmanager
def progress_bars(total: dict[str, int], *, enabled: bool) -> Iterator:
    """Yield a ``progress(phase, n)`` callback drawing one tqdm bar per phase on stderr.

    Bars appear only on a terminal (never in logs or CI) and not with ``--quiet``.
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(phase: str, n: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total.get(phase), desc=phase, unit="step", leave=False)
        bar.update(n)

    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()
