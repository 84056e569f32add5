"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (recipe, paths, names): reported without a traceback."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix when a close choice exists, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(what: str, word: str, choices: Iterable[str]) -> UserError:
    """'unknown <what> 'word'; expected one of a, b (did you mean ...)'."""
    choices = sorted(choices)
    return UserError(f"unknown {what} '{word}'; expected one of {', '.join(choices)}{did_you_mean(word, choices)}")
