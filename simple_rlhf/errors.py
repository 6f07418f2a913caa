"""A mistake in the user's input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys

class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


def describe(error: Exception) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def exit_on_user_error(main):
    """Run `main`; turn a UserError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
