"""Weights & Biases alerts: ``wandb.alert`` (Slack or email, as set up in W&B) for each rate-limited alarm.

``GradGuard`` connects a :class:`WandbAlert` by itself when the Trainer has a ``WandbLogger``; with a
plain loop, pass ``WandbAlert(run)`` (a ``wandb`` run) among ``alert_handlers``. It calls
``run.alert(title=..., text=..., level=...)`` with the level mapped from the event (``ERROR`` for a
non-finite step or the guard's stop, ``WARN`` for the other alarms); routine events are not sent.
``wandb`` stays optional: this module never imports it.

Example::

    >>> class Run:                                 # a stand-in for a wandb run
    ...     def alert(self, **kw): print(kw["title"], "|", kw["level"])
    >>> from lightning_gradguard.events import GradEvent
    >>> WandbAlert(Run()).on_alert(GradEvent("nonfinite", step=7), "NaN at step 7", "run-1")
    GradGuard: nonfinite at step 7 (run-1) | ERROR
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_gradguard.events import GradEvent

__all__ = ["WandbAlert"]

log = logging.getLogger("lightning_gradguard")
_ERRORS = frozenset({"nonfinite", "stopped"})


class WandbAlert:
    """Send rate-limited alarms to ``wandb`` through a run's ``alert`` method (see the module doc).

    Args:
        run: a ``wandb`` run (``wandb.init()``, or ``WandbLogger.experiment``).
    """

    def __init__(self, run: Any) -> None:
        if not callable(getattr(run, "alert", None)):
            raise TypeError(f"Expected `run` to be a wandb run (with an `alert` method), but got {type(run).__name__}.")
        self.run = run
        self._failed = False

    def on_alert(self, event: GradEvent, message: str, run: str = "") -> None:
        title = f"GradGuard: {event.kind} at step {event.step}" + (f" ({run})" if run else "")
        level = "ERROR" if event.kind in _ERRORS else "WARN"
        try:
            self.run.alert(title=title, text=message, level=level)
        except Exception:  # W&B down or offline: never break training, say it once
            if not self._failed:
                self._failed = True
                log.exception("GradGuard: wandb.alert failed; later failures are not logged.")

    def close(self, timeout: float | None = None) -> None:
        """Nothing to wait for: ``wandb`` sends alerts itself."""

    def __repr__(self) -> str:
        return f"WandbAlert({type(self.run).__name__})"
