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
