"""User-facing errors.

A `DeltacliError` is a mistake in what the user asked for (a bad recipe key, a missing file,
a model that cannot be reached offline). The CLI shows it as one line and exits with its code;
anything else is a bug and keeps its traceback.
"""

import difflib


class DeltacliError(Exception):
    """Something the user can fix: shown as one line on stderr, exit code 2, no traceback."""

    exit_code = 2
    label = "error"  # how the line starts


class VerificationError(DeltacliError):
    """A self-check failed (e.g. a merged model disagrees with base + delta): exit code 1."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """What a library's exception says, in one line (its type where it says nothing)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean 'lora'?)` when a choice is close to `word`, else nothing."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
