"""The one error type for bad user input: the CLI turns it into a message and exit code 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: says what is wrong (naming the argument, layer or file) and how to fix it."""

    def __init__(self, what: str, fix: str = ""):
        self.what, self.fix = what, fix
        super().__init__(f"{what}. Fix: {fix}" if fix else what)
