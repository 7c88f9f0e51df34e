"""User-facing errors: one line naming the problem and the fix; the CLI prints them and exits 2."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class PadkdError(Exception):
    """An error caused by the user's input (config, paths, checkpoints); shown without a traceback, on one
    line: newlines in the message (from a parser's own text, say) become spaces."""

    def __init__(self, message: str = "") -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


class NonFiniteLossError(PadkdError):
    """A loss became NaN or inf; training stops and the last good checkpoint is kept."""


def did_you_mean(word: str, choices: Iterable[str], list_all: bool = True) -> str:
    """Return "; did you mean 'x'?" for the closest choice, else a list of the allowed values (`list_all`,
    for short lists) or nothing."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; allowed: {', '.join(choices)}" if choices and list_all else ""
