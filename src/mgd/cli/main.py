"""``mgd``: parse the command line and dispatch to a subcommand.

Every :class:`~mgd.errors.UserError` becomes one line on stderr and exit code 2; argparse
errors exit with 2 as well. A diverged replay exits with 3, a failed collective (another rank
died or timed out) with 4. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mgd._version import __version__
from mgd.cli import estimate, grad, optimize, poison, schedule, select, smoothness, train
from mgd.distributed import DistributedError, first_line, launched_by_torchrun
from mgd.errors import ReplayDivergedError, UserError

SUBCOMMANDS = (train, grad, optimize, select, poison, schedule, smoothness, estimate)
#: Commands that run under ``torchrun`` (every rank computes, rank 0 writes).
DATA_PARALLEL = ("train", "grad", "optimize")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (usage stays available with --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mgd",
        description="Exact metagradients through whole training runs (REPLAY), "
        "and metagradient descent.",
    )
    parser.add_argument("--version", action="version", version=f"mgd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if launched_by_torchrun() and args.command not in DATA_PARALLEL:
            raise UserError(
                f"mgd {args.command} does not run data-parallel; launch it without torchrun "
                f"(data-parallel commands: {', '.join(DATA_PARALLEL)})"
            )
        code = int(args.run(args) or 0)
        _finish_together()
        return code
    except UserError as exc:
        print(f"mgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ReplayDivergedError as exc:
        print(f"mgd {args.command}: replay diverged: {exc}", file=sys.stderr)
        return 3
    except DistributedError as exc:
        print(f"mgd {args.command}: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(f"mgd {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _finish_together() -> None:
    """Under torchrun, wait until every rank is done before tearing the group down.

    A rank that exits while another still uses the connection can make gloo abort the
    other process at exit ("terminate called without an active exception").
    """
    if launched_by_torchrun():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.barrier()
            except Exception as error:  # a rank died after finishing its work
                raise DistributedError(f"ranks could not finish together ({first_line(error)})") from None


def _leave_process_group() -> None:
    """Tear down torch.distributed's group if a data-parallel command started one."""
    if launched_by_torchrun():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
