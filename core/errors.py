"""The one user-facing error type.

Raised for bad input anywhere in the project (a file that cannot be read, a mask of the wrong
size, an unknown name in params.yaml, ...). The CLI catches it once, prints one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: the message names the file (when there is one) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
