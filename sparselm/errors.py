"""The one error type for bad user input: the CLI turns it into a message and exit code 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: says what is wrong (naming the argument, layer or file) and how to fix it."""

    def __init__(self, what: str, fix: str = ""):
        self.what, self.fix = what, fix
        super().__init__(f"{what}. Fix: {fix}" if fix else what)


def check_count(name: str, value: int | None, least: int = 1) -> None:
    """A count option (``--nsamples``, ``--seqlen``…) is an integer >= ``least``, or None for its default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise InputError(f"{name} must be an integer >= {least} (got {value!r})",
                         f"pass {name} {least} or more, or leave it out for the default")
