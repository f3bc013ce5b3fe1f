"""Batches and steps held and printed as ranges, below every stage: a rollback over a hundred steps
under gradient accumulation of 8 undoes 800 batches, which its event holds as one range,
``[epoch, first, last]``, and ``gradguard report`` and the tab print as ``0:0–0:799 (800 batches)``.
Imports nothing, so that reading event files needs no torch.

Example::

    >>> ranges = batch_ranges([(0, 3), (0, 1), (0, 2), (0, 2), (1, 0)])
    >>> ranges
    [[0, 1, 3], [1, 0, 0]]
    >>> format_batch_ranges(ranges)
    '0:1–0:3, 1:0 (4 batches)'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["batch_count", "batch_ranges", "format_batch_ranges", "format_int_ranges", "int_ranges"]

MOST_RANGES = 3  # ranges printed in one line; the rest are counted


def int_ranges(values: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive integers, ``(first, last)`` each, in order; duplicates count once.

    Example::

        >>> int_ranges([5, 1, 2, 3, 3, 9])
        [(1, 3), (5, 5), (9, 9)]
    """
    runs: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def batch_ranges(positions: Iterable[Sequence[int]]) -> list[list[int]]:
    """``(epoch, batch_idx)`` positions as ranges ``[epoch, first, last]`` of consecutive batch indices,
    in order; a position given twice counts once. A range never crosses an epoch: where an epoch ends
    is not known here."""
    by_epoch: dict[int, list[int]] = {}
    for epoch, batch_idx in positions:
        by_epoch.setdefault(int(epoch), []).append(int(batch_idx))
    return [[epoch, first, last] for epoch in sorted(by_epoch) for first, last in int_ranges(by_epoch[epoch])]


def batch_count(ranges: Iterable[Sequence[int]]) -> int:
    """How many batches ranges ``[epoch, first, last]`` hold."""
    return sum(last - first + 1 for _, first, last in ranges)


def format_batch_ranges(ranges: Sequence[Sequence[int]], most: int = MOST_RANGES) -> str:
    """Ranges ``[epoch, first, last]`` as ``epoch:batch`` text with the count: ``0:0–0:20 (21 batches)``.
    Past ``most`` ranges, the rest are counted, so that the line stays short however many there are.

    Example::

        >>> format_batch_ranges([[0, 0, 20]])
        '0:0–0:20 (21 batches)'
        >>> format_batch_ranges([[0, 7, 7]])
        '0:7 (1 batch)'
        >>> format_batch_ranges([[0, 2 * k, 2 * k] for k in range(50)])
        '0:0, 0:2, 0:4 and 47 more ranges (50 batches)'
    """
    shown = ", ".join(f"{e}:{a}" if a == b else f"{e}:{a}–{e}:{b}" for e, a, b in ranges[:most])
    more = f" and {len(ranges) - most} more ranges" if len(ranges) > most else ""
    n = batch_count(ranges)
    return f"{shown}{more} ({n} batch{'' if n == 1 else 'es'})"


def format_int_ranges(values: Iterable[int], most: int = MOST_RANGES) -> str:
    """Integers (steps) as ranges: ``0–4, 9``; past ``most`` ranges, the rest are counted.

    Example::

        >>> format_int_ranges([0, 1, 2, 3, 4, 9])
        '0–4, 9'
        >>> format_int_ranges([1, 3, 5, 7, 9], most=2)
        '1, 3 and 3 more'
    """
    runs = int_ranges(values)
    shown = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs[:most])
    return shown + (f" and {len(runs) - most} more" if len(runs) > most else "")
