"""User-facing errors: each one is printed by the CLI as a single line, followed by a non-zero exit."""

from __future__ import annotations

import os


class FocusingError(Exception):
    """Bad input or state that the user can fix; the message is one line and says what is wrong."""


class InputError(FocusingError):
    """A problem with one input file; the message names the file first."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def failure_message(exc: BaseException) -> str:
    """One line for a batch job's log of a failed item: an `InputError`'s problem (the item's file is logged
    beside it), a `FocusingError`'s message, else the exception's type and the first line of its message."""
    if isinstance(exc, InputError):
        return exc.problem
    if isinstance(exc, FocusingError):
        return str(exc)
    message = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {message}"
