"""``mgd``: parse the command line and dispatch to a subcommand.

Every :class:`~mgd.errors.UserError` becomes one line on stderr and exit code 2; argparse
errors exit with 2 as well. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mgd._version import __version__
from mgd.cli import estimate, grad, optimize, poison, schedule, select, smoothness, train
from mgd.errors import ReplayDivergedError, UserError

SUBCOMMANDS = (train, grad, optimize, select, poison, schedule, smoothness, estimate)


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
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"mgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ReplayDivergedError as exc:
        print(f"mgd {args.command}: replay diverged: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"mgd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
