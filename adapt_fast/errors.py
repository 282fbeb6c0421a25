"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (configuration, data files, paths). The message is one line."""


class ConfigError(UserError):
    """A configuration field is unknown or has a bad value."""


class DataError(UserError):
    """A data file cannot be used; the message names the file (and line for JSONL)."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command's `main` so a UserError prints `error: <message>` and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
