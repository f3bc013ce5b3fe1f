"""Words for people, below every stage: counts ("1 non-finite step", "3 non-finite steps") and the
name a user probably meant. Imports nothing but the standard library.

Example::

    >>> plural(1, "non-finite step"), plural(3, "non-finite step"), plural(2, "batch", "batches")
    ('1 non-finite step', '3 non-finite steps', '2 batches')
    >>> unmatched("AGC(exclude=...)", ["haed"], ["l0", "l1", "head"], "layer or parameter")
    "GradGuard: AGC(exclude=...) names 'haed', which matches no layer or parameter of the model (did you mean 'head'?)."
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["closest", "plural", "unmatched"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun``, or its plural (``nouns``, default ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else (nouns if nouns is not None else noun + 's')}"


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name`` (a typo's likely intent), or None when none is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unmatched(option: str, names: Sequence[str], candidates: Sequence[str], what: str) -> str:
    """The warning for names given to ``option`` that match nothing, each with the closest candidate."""
    hints = [f"did you mean {c!r}?" for c in (closest(n, candidates) for n in names) if c is not None]
    listed = ", ".join(repr(n) for n in names)
    verb = "matches" if len(names) == 1 else "match"
    hint = f" ({'; '.join(hints)})" if hints else f" (the model's: {', '.join(candidates[:12])})" if candidates else ""
    return f"GradGuard: {option} names {listed}, which {verb} no {what} of the model{hint}."
