"""Errors raised for problems a user can fix.

The CLI turns every :class:`UserError` into a one-line message and exit code 2; nothing else
is caught, so a traceback always means a bug in ``mgd``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the problem and how to fix it."""


class ReplayDivergedError(RuntimeError):
    """A replayed training state differs from the one the forward pass produced.

    REPLAY is exact only when every replayed step is bit-identical to the original; when it
    is not, the metagradient would silently belong to another trajectory, so we stop.
    """


def check_choices(values, allowed, what: str) -> list[str]:
    """Validate a list of names (e.g. ``--methods``): non-empty, known, no repeats.

    Args:
        values: the names given (strings; blanks are ignored).
        allowed: the valid names.
        what: how to refer to the list in messages, e.g. ``"--methods"``.
    """
    names = [v.strip() for v in values if v.strip()]
    choices = ", ".join(allowed)
    if not names:
        raise UserError(f"{what} is empty; give one or more of {choices}")
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise UserError(f"{what}: unknown {', '.join(unknown)}; choose from {choices}")
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise UserError(f"{what} lists {', '.join(repeated)} more than once")
    return names
