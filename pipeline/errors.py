"""Errors a user can cause: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class KennelError(Exception):
    """A problem with the user's input or environment, worded as: what is wrong, and the fix."""

    exit_code = 1


class TargetUnavailable(KennelError):
    """The chosen target cannot run this command (yet)."""

    exit_code = 2
