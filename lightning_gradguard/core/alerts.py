"""Telling people: where each event goes, once, on rank zero, without spam.

:class:`AlertRouter` takes every :class:`~lightning_gradguard.events.GradEvent` the guard records:

* each user handler (``alert_handlers=[callable, ...]``) is called with *every* event; a handler
  that raises is logged once and never stops training;
* the ``lightning_gradguard`` Python logger gets a record (WARNING for alarms, INFO for routine
  events such as an fp16 overflow the GradScaler handles by design), rate-limited: the same kind on
  the same layers at most once per ``alert_every`` optimizer steps, the next record saying how many
  were suppressed;
* alarms also raise a :class:`GradGuardWarning` through :mod:`warnings` (same rate limit), so they
  show in a console and in ``pytest.warns``;
* sinks (the Lightning adapter adds a TensorBoard text summary ``gradguard/alerts``) get the same
  rate-limited messages;
* notifiers (entries of ``alert_handlers`` with an ``on_alert(event, message, run)`` method, such as
  :class:`~lightning_gradguard.notify.webhook.WebhookAlert`) get the same rate-limited *alarms*
  (routine events are not sent to a person), with the run's name (:attr:`AlertRouter.run_name`);
  :meth:`AlertRouter.close` lets them finish sending.

The library's logger has a :class:`logging.NullHandler`, so its records show only where the
application configures logging; the console sees each alarm once, as a warning.

On ``torch.distributed`` ranks other than zero nothing is emitted: every rank computes the same
events, rank zero tells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from lightning_gradguard.errors import GradGuardWarning, warn
from lightning_gradguard.events import GradEvent

__all__ = ["AlertRouter", "GradGuardWarning", "is_rank_zero", "log", "warn"]

log = logging.getLogger("lightning_gradguard")
log.addHandler(logging.NullHandler())

_ROUTINE = frozenset({"amp_overflow"})


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on global rank 0 inside it."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


Handler = Callable[[GradEvent], Any]
Sink = Callable[[GradEvent, str], None]  # a rate-limited alert: (event, message)
Tap = Callable[[GradEvent], None]  # every event


class AlertRouter:
    """Routes events to handlers, the logger, warnings and sinks, rate-limited (see the module doc).

    Args:
        alert_every: the same kind on the same layers is logged at most once per this many optimizer
            steps, an int >= 1.
        handlers: callables called as ``handler(event)`` with every event, on rank zero.

    Example::

        >>> seen = []
        >>> router = AlertRouter(alert_every=100, handlers=[seen.append])
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     for step in range(250):
        ...         router(GradEvent("spike", step=step, message=f"spike at {step}"))
        >>> len(seen), router.emitted, router.suppressed["spike"]
        (250, 3, 247)
    """

    def __init__(self, alert_every: int = 100, handlers: Sequence[Any] = ()) -> None:
        self.alert_every = alert_every
        self.handlers: list[Handler] = [h for h in handlers if not callable(getattr(h, "on_alert", None))]
        self.notifiers: list[Any] = [h for h in handlers if callable(getattr(h, "on_alert", None))]
        self.run_name = ""  # the adapter sets it (the logger's name and version)
        self.sinks: list[Callable[[GradEvent, str], None]] = []
        self.taps: list[Callable[[GradEvent], None]] = []  # every event, unthrottled
        self._connected: dict[int, tuple[Sink | None, Tap | None]] = {}
        self._last: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
        self._failed: set[int] = set()
        self.emitted = 0
        self.suppressed: dict[str, int] = {}

    def connect(
        self,
        owner: object,
        *,
        alert: Sink | None = None,
        tap: Tap | None = None,
    ) -> None:
        """Add ``owner``'s sink (``alert(event, message)``: rate-limited alerts) and ``tap`` (every
        event), replacing whatever ``owner`` connected before."""
        self.disconnect(owner)
        self._connected[id(owner)] = (alert, tap)
        if alert is not None:
            self.sinks.append(alert)
        if tap is not None:
            self.taps.append(tap)

    def disconnect(self, owner: object) -> None:
        """Remove what ``owner`` connected (nothing if it connected nothing)."""
        alert, tap = self._connected.pop(id(owner), (None, None))
        if alert is not None and alert in self.sinks:
            self.sinks.remove(alert)
        if tap is not None and tap in self.taps:
            self.taps.remove(tap)

    def __call__(self, event: GradEvent) -> None:
        if not is_rank_zero():
            return
        for tap in self.taps:
            try:
                tap(event)
            except Exception:
                if id(tap) not in self._failed:
                    self._failed.add(id(tap))
                    log.exception("GradGuard: event tap %r raised; errors are not repeated.", tap)
        for handler in self.handlers:
            try:
                handler(event)
            except Exception:  # a broken handler must not kill training: log it once
                if id(handler) not in self._failed:
                    self._failed.add(id(handler))
                    log.exception(
                        "GradGuard: alert handler %r raised; it stays installed, errors are not repeated.", handler
                    )
        key = (event.kind, tuple(event.layers))
        last, count = self._last.get(key, (None, 0))
        if last is not None and event.step - last < self.alert_every:
            self._last[key] = (last, count + 1)
            self.suppressed[event.kind] = self.suppressed.get(event.kind, 0) + 1
            return
        self._last[key] = (event.step, 0)
        message = event.message
        if count:
            message += f" ({count} similar alert{'s' if count > 1 else ''} suppressed since step {last})"
        self.emitted += 1
        if event.kind in _ROUTINE:
            log.info(message)
        else:
            log.warning(message)
            warn(message)
        for sink in self.sinks:
            try:
                sink(event, message)
            except Exception:
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    log.exception("GradGuard: alert sink %r raised; errors are not repeated.", sink)
        if event.kind in _ROUTINE:
            return
        for notifier in self.notifiers:
            try:
                notifier.on_alert(event, message, self.run_name)
            except Exception:
                if id(notifier) not in self._failed:
                    self._failed.add(id(notifier))
                    log.exception("GradGuard: alert notifier %r raised; errors are not repeated.", notifier)

    def undelivered(self) -> tuple[int, int]:
        """The alarms the notifiers could not deliver, summed: (failed after every retry, never arrived
        at all: failed, a full queue, or still queued at close). Notifiers without such counters count 0."""
        failed = sum(int(getattr(n, "failed", 0)) for n in self.notifiers)
        dropped = sum(int(getattr(n, "dropped", 0)) for n in self.notifiers)
        return failed, dropped

    def close(self, timeout: float | None = None) -> None:
        """Let every notifier finish sending (each waits at most its own ``close_timeout``, or ``timeout``)."""
        for notifier in self.notifiers:
            close = getattr(notifier, "close", None)
            if callable(close):
                try:
                    close(timeout)
                except Exception:
                    log.exception("GradGuard: closing the alert notifier %r failed.", notifier)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last": [[k, list(layers), s, c] for (k, layers), (s, c) in self._last.items()],
            "suppressed": dict(self.suppressed),
            "emitted": self.emitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = {(str(k), tuple(layers)): (int(s), int(c)) for k, layers, s, c in state.get("last", [])}
        self.suppressed = {str(k): int(v) for k, v in dict(state.get("suppressed", {})).items()}
        self.emitted = int(state.get("emitted", 0))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sinks"], state["taps"], state["_connected"] = [], [], {}  # bound to live loggers
        return state
