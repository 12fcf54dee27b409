"""One base class for user mistakes, so the command line turns any stage's error into one line and exit code 2.

Every stage raises a subclass of ``UserError`` (or ``UserError`` itself) for a problem the user can fix: a bad value,
a missing or damaged file, a folder that cannot be written. The message names what is wrong and what to do. Bugs
stay ordinary exceptions, so they keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``str(error)`` is one line saying what to do. The CLI exits 2 on it."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, with its type when the message is empty (for wrapped errors)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return first or type(error).__name__
