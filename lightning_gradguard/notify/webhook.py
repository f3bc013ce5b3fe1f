"""A webhook that tells a person: one JSON POST per alert, to Slack, Mattermost, Discord or your own.

:class:`WebhookAlert` is an alert notifier: give it to the guard among ``alert_handlers`` and the
guard's :class:`~lightning_gradguard.core.alerts.AlertRouter` sends it the *rate-limited* alarms
(the same kind on the same layers at most once per ``alert_every`` steps, the next one saying how
many were suppressed), on rank zero only. Routine events (an fp16 overflow the GradScaler handles)
are not sent.

It never slows training and never breaks it:

* :meth:`on_alert` only puts the message on a bounded queue (``max_queue``; when full, the message
  is dropped and counted); a daemon thread POSTs it, with a ``timeout`` per request and ``retries``
  more tries, backing off 0.5 s, 1 s, 2 s, ...;
* a message that still fails is dropped and counted in :attr:`~WebhookAlert.failed` (and in
  :attr:`~WebhookAlert.dropped`, every message that never arrived); the first failure raises a
  :class:`~lightning_gradguard.GradGuardWarning` (once per notifier: a mistyped or firewalled URL is
  seen at once, not only when nothing arrives) and is logged, with the HTTP status or the error,
  never the URL; the guard's end-of-fit summary counts failed and dropped alerts;
* :meth:`close` (called by ``GradGuard`` when training ends or fails, and at interpreter exit) waits
  at most ``close_timeout`` seconds for the queue to drain.

The URL is a secret: pass it, or name an environment variable that holds it (``url_env``, by
default ``GRADGUARD_WEBHOOK_URL``). It never appears in a repr, a log record, an event file, a dump
or a checkpoint.

The body is ``{"text": ..., "run": ..., "event": {...}}``: ``text`` is what Slack, Mattermost and
Discord's Slack-compatible endpoint (``.../slack``) show; ``event`` is the structured
:class:`~lightning_gradguard.events.GradEvent` (without its ``extra``); an event that names ranks (a
replica divergence, a replay in a run of several processes) adds ``"ranks": [{"rank", "host",
"device"}]`` (:func:`~lightning_gradguard.health.ranks.named_ranks`).

Example::

    >>> alert = WebhookAlert("https://hooks.example.com/services/T0/B0/secret")
    >>> alert
    WebhookAlert(url=<secret>, timeout=5.0, retries=2)
    >>> WebhookAlert("hooks.example.com/x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Expected `url` to be an http(s) URL ..., but got a value without 'http://' or 'https://'.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from lightning_gradguard._validate import check_int, check_number
from lightning_gradguard.core.alerts import warn
from lightning_gradguard.events import GradEvent
from lightning_gradguard.health.ranks import named_ranks

__all__ = ["WebhookAlert"]

log = logging.getLogger("lightning_gradguard")
_STOP = object()


def _checked_url(url: str | None, url_env: str | None) -> str:
    if url is None:
        if not url_env or not os.environ.get(url_env):
            raise ValueError(
                f"Expected `url`, or the environment variable `{url_env}` (`url_env`), to hold the webhook's URL, "
                "but got neither."
            )
        url = os.environ[url_env]
    if not isinstance(url, str):
        raise TypeError(f"Expected `url` to be a string, but got {type(url).__name__}.")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):  # the message never quotes the URL: it is a secret
        raise ValueError(
            "Expected `url` to be an http(s) URL such as 'https://hooks.slack.com/services/...', but got a value "
            "without 'http://' or 'https://'."
        )
    if not parts.hostname:
        raise ValueError("Expected `url` to name a host, such as 'https://hooks.slack.com/...', but got none.")
    return url.strip()


class WebhookAlert:
    """POST each rate-limited alarm as JSON to a webhook, from a background thread (see the module doc).

    Args:
        url: the incoming webhook's URL, or None to read it from ``url_env``.
        url_env: the environment variable holding the URL when ``url`` is None.
        run_name: the run's name in each message; default: the one the guard gives (the Lightning
            logger's name and version), else this host's name.
        timeout: seconds per request, ``> 0``.
        retries: further tries after a failed one, an int >= 0.
        max_queue: messages waiting at most; more are dropped and counted, an int >= 1.
        close_timeout: seconds :meth:`close` waits for the queue, ``>= 0``.

    Raises:
        ValueError: ``url`` is not an http(s) URL, or neither ``url`` nor ``url_env`` holds one; an
            argument is out of range.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        url_env: str | None = "GRADGUARD_WEBHOOK_URL",
        run_name: str | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        max_queue: int = 100,
        close_timeout: float = 5.0,
    ) -> None:
        self._url = _checked_url(url, url_env)
        self.run_name = run_name
        self.timeout = float(check_number("timeout", timeout, minimum=0.0))  # type: ignore[arg-type]
        self.retries = int(check_int("retries", retries, minimum=0))  # type: ignore[arg-type]
        self.max_queue = int(check_int("max_queue", max_queue, minimum=1))  # type: ignore[arg-type]
        self.close_timeout = float(check_number("close_timeout", close_timeout, minimum=0.0, strict=False))  # type: ignore[arg-type]
        self.sent = 0
        self.dropped = 0  # every message that never arrived: failed, a full queue, still queued at close
        self.failed = 0  # messages whose delivery failed after every retry
        self._failed_once = False
        self._queue: queue.Queue[Any] = queue.Queue(self.max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebhookAlert(url=<secret>, timeout={self.timeout}, retries={self.retries})"

    # ------------------------------------------------------------------ the training thread's side
    def on_alert(self, event: GradEvent, message: str, run: str = "") -> None:
        """Queue one alert (never blocks: a full queue drops it and counts it in :attr:`dropped`)."""
        name = self.run_name or run or socket.gethostname()
        row = event.as_dict()
        fields: dict[str, Any] = {k: v if not (isinstance(v, float) and not math.isfinite(v)) else None
                                  for k, v in row.items() if k != "extra"}  # fmt: skip
        ranks = named_ranks(row)  # a divergence's odd ranks, a replay's suspects: where to look
        if ranks:
            fields["ranks"] = ranks
        body = {"text": f"[{name}] step {event.step}: {message}", "run": name, "event": fields}
        self._ensure_thread()
        try:
            self._queue.put_nowait(json.dumps(body).encode())
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float | None = None) -> None:
        """Wait at most ``timeout`` (default ``close_timeout``) seconds for queued messages, then stop."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._thread = None
        while True:  # what did not go out in time is dropped, and counted
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self.dropped += 1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # a copy for another process: a fresh queue and thread there
        state["_queue"], state["_thread"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._queue = queue.Queue(self.max_queue)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the sender thread
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gradguard-webhook", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._send(item)

    def _send(self, body: bytes) -> None:
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            request = urllib.request.Request(self._url, body, {"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except Exception as exc:  # a timeout, a refused connection: the run goes on
                error = type(exc).__name__
        self.failed += 1
        self.dropped += 1
        if not self._failed_once:
            self._failed_once = True
            message = (
                f"GradGuard: a webhook alert could not be delivered ({error}) after {self.retries + 1} "
                f"tr{'y' if self.retries == 0 else 'ies'} and was dropped: check the webhook's URL and that this "
                "machine can reach it. Later failures are counted (WebhookAlert.failed), not repeated."
            )
            log.warning(message)
            warn(message)
