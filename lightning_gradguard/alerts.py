"""Telling people: events become one rank-zero warning or log record each.

Alarms (non-finite gradients) are emitted as a :class:`GradGuardWarning` through :mod:`warnings`,
on rank zero only. Routine events (an fp16 overflow that the GradScaler handles by design) go to the
``lightning_gradguard`` Python logger at INFO level, so they never spam a console.
"""

from __future__ import annotations

import logging
import warnings

import torch.distributed as dist

from lightning_gradguard.events import GradEvent

__all__ = ["GradGuardWarning", "emit", "is_rank_zero", "log"]

log = logging.getLogger("lightning_gradguard")

_ROUTINE = frozenset({"amp_overflow"})


class GradGuardWarning(UserWarning):
    """The warning category of every alarm the guard emits."""


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on global rank 0 inside it."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def emit(event: GradEvent) -> None:
    """Emit ``event`` once, on rank zero: a warning for alarms, an INFO record for routine events.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     emit(GradEvent("nonfinite", step=3, message="NaN gradient at step 3"))
        >>> [str(w.message) for w in caught]
        ['NaN gradient at step 3']
    """
    if not is_rank_zero():
        return
    if event.kind in _ROUTINE:
        log.info(event.message)
        return
    log.debug(event.message)
    warnings.warn(event.message, GradGuardWarning, stacklevel=2)
