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
