"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training.max_bad_steps non-finite steps in a row
EXIT_SIGINT = 130  # 128 + SIGINT: stopped by Ctrl-C (checkpoint written)
EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped by the scheduler / kill (checkpoint written)


class UserError(Exception):
    """Bad input from the user (configuration, data files, paths). The message is one line."""


class ConfigError(UserError):
    """A configuration field is unknown or has a bad value."""


class DataError(UserError):
    """A data file cannot be used; the message names the file (and line for JSONL)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def some_of(names: list[str], most: int = 5) -> str:
    """The first `most` names, comma-separated, then how many more: a line that stays one line for 1,600 tasks."""
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more:,} more" if more > 0 else "")


class DataWarning(UserWarning):
    """Something the user should know that is not an error (examples reused, a task ran out, a setting that has no
    effect). The commands print it as one `warning:` line."""


def _show_user_warning(previous):
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            if os.environ.get("RANK", "0") == "0":  # every rank finds the same thing: rank 0 says it
                from tqdm import tqdm

                tqdm.write(f"warning: {message}", file=sys.stderr)  # on a line of its own, above a progress bar
        else:
            previous(message, category, filename, lineno, file, line)

    return show


class RunStopped(Exception):
    """The run stopped before its end, on purpose and cleanly: a signal (SIGTERM/SIGINT) or too many
    non-finite steps. A checkpoint has been written; `exit_code` is the process's exit status and the
    message (possibly empty, e.g. on ranks other than 0) is printed as it is."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command's `main` so a UserError prints `error: <message>` and exits with code 2, a RunStopped
    prints its message and exits with its code, and a DataWarning prints as one `warning: <message>` line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_user_warning(warnings.showwarning)
                return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except RunStopped as stop:
            if str(stop):
                print(str(stop), file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:  # Ctrl-C before the trainer's handler is in place, or a second Ctrl-C
            print("aborted (Ctrl-C): no checkpoint was written for this stop", file=sys.stderr, flush=True)
            sys.exit(EXIT_SIGINT)

    return wrapper
