"""The rules of the webhook notifier (notify/webhook.py), each checked on its own: what `make mutate` showed
no test held.

The body of a POST, the run's name, the retries' backoff (0.5 s, 1 s, 2 s, ...: the requested sleeps are
recorded, no clock is read), `close` dropping and counting what did not go out, a copy for another process
(pickled) that works on its own, and the URL and the arguments checked at construction, by name.
"""

from __future__ import annotations

import math
import pickle
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from lightning_gradguard import GradEvent, GradGuardWarning, WebhookAlert
from tests.notify.test_notify import SECRET, Hook

HANG_GUARD = 120.0  # seconds: only so that a broken test ends, never a measure


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL on a port nobody listens on: every POST fails at once (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}/services/{SECRET}"


def _event() -> GradEvent:
    return GradEvent("nonfinite", step=4, layers=("enc", "head"), origin="head", value=math.inf, message="NaN",
                     optimizer_idx=1, action="skipped", extra={"origin_certain": True})  # fmt: skip


def test_the_body_is_the_text_the_run_and_the_event_without_extra_non_finite_as_null() -> None:
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url, close_timeout=HANG_GUARD)
        alert.on_alert(_event(), "GradGuard: NaN at step 4", "nightly/3")
        alert.on_alert(GradEvent("exploding", step=5, value=12.5, message="big"), "big", "nightly/3")
        alert.close()
    assert hook.posts == [
        {"text": "[nightly/3] step 4: GradGuard: NaN at step 4", "run": "nightly/3",
         "event": {"kind": "nonfinite", "step": 4, "layers": ["enc", "head"], "origin": "head", "value": None,
                   "message": "NaN", "optimizer_idx": 1, "action": "skipped"}},
        {"text": "[nightly/3] step 5: big", "run": "nightly/3",
         "event": {"kind": "exploding", "step": 5, "layers": [], "origin": None, "value": 12.5,
                   "message": "big", "optimizer_idx": 0, "action": "none"}},
    ]  # fmt: skip
    assert (alert.sent, alert.failed, alert.dropped) == (2, 0, 0)


def test_an_event_that_names_ranks_carries_them_with_their_hosts_and_devices() -> None:
    """A replica divergence names the odd rank: the payload says where to look (the rest of ``extra``
    stays out)."""
    divergence = GradEvent("replica_divergence", step=7, layers=("l1",), message="apart", action="repaired",
                           extra={"ranks": [1], "apart": [0, 1, 2], "majority": True, "layers": ["l1"],
                                  "devices": {"1": {"host": "node-b", "device": "cuda:1"}}})  # fmt: skip
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url, close_timeout=HANG_GUARD)
        alert.on_alert(divergence, "apart", "ddp")
        alert.close()
    (post,) = hook.posts
    assert post["event"]["ranks"] == [{"rank": 1, "host": "node-b", "device": "cuda:1"}]
    assert set(post["event"]) == {*GradEvent.__dataclass_fields__} - {"extra"} | {"ranks"}


def test_the_run_is_named_by_the_option_else_the_guard_else_the_host() -> None:
    with Hook().running() as hook:
        for run_name, run in (("mine", "guard/1"), (None, "guard/1"), (None, ""), (None, None)):
            alert = WebhookAlert(hook.url, run_name=run_name, close_timeout=HANG_GUARD)
            if run is None:
                alert.on_alert(_event(), "m")  # no name from the guard at all
            else:
                alert.on_alert(_event(), "m", run)
            alert.close()
    host = socket.gethostname()
    assert [p["run"] for p in hook.posts] == ["mine", "guard/1", host, host]
    assert hook.posts[3]["text"] == f"[{host}] step 4: m"


@pytest.mark.parametrize(("retries", "sleeps", "tries"), [(0, [], "1 try"), (3, [0.5, 1.0, 2.0], "4 tries")])
def test_retries_back_off_and_a_failure_is_said_once_with_its_error(
    monkeypatch: pytest.MonkeyPatch, refused_url: str, retries: int, sleeps: list[float], tries: str
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the backoff's requests, not a clock
    alert = WebhookAlert(refused_url, retries=retries, timeout=HANG_GUARD, close_timeout=HANG_GUARD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            alert.on_alert(GradEvent("nonfinite", step=step), "NaN", "run")
        alert.close()
    assert slept == sleeps * 2  # per alert
    assert (alert.sent, alert.failed, alert.dropped) == (0, 2, 2)
    said = [str(w.message) for w in caught if issubclass(w.category, GradGuardWarning)]
    assert said == [
        f"GradGuard: a webhook alert could not be delivered (URLError) after {tries} and was dropped: check the "
        "webhook's URL and that this machine can reach it. Later failures are counted (WebhookAlert.failed), not "
        "repeated."
    ]


@contextmanager
def held(hook_gate: threading.Event) -> Iterator[threading.Timer]:
    """A watchdog that lets the server answer after HANG_GUARD seconds: only so that a broken test ends.
    Whether it fired is the test's evidence that something waited for the server (no clock decides)."""
    watchdog = threading.Timer(HANG_GUARD, hook_gate.set)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield watchdog
    finally:
        watchdog.cancel()
        hook_gate.set()


@pytest.mark.parametrize(("max_queue", "queued", "dropped"), [(100, 2, 2), (1, 1, 1)], ids=["room", "full"])
def test_close_with_no_time_left_drops_and_counts_what_did_not_go_out_without_waiting(
    max_queue: int, queued: int, dropped: int
) -> None:
    gate = threading.Event()
    with Hook(gate=gate).running() as hook, held(gate):
        alert = WebhookAlert(hook.url, retries=0, timeout=HANG_GUARD * 10, max_queue=max_queue,
                             close_timeout=HANG_GUARD * 10)  # fmt: skip
        alert.close()  # nothing sent yet: nothing to wait for
        assert alert.dropped == 0
        alert.on_alert(GradEvent("nonfinite", step=0), "a", "run")
        assert hook.arrived.wait(HANG_GUARD)  # the server holds the first
        for step in range(1, 1 + queued):  # queued behind it; with max_queue=1 the queue is then full
            alert.on_alert(GradEvent("nonfinite", step=step), "b", "run")
        alert.close(timeout=0.0)  # no time: neither for the stop signal nor for the sender
        assert not gate.is_set(), "close() waited for the webhook's server"
        assert alert.dropped == dropped


def test_close_waits_close_timeout_by_default() -> None:
    gate = threading.Event()
    with Hook(gate=gate).running() as hook, held(gate):
        alert = WebhookAlert(hook.url, retries=0, timeout=HANG_GUARD * 10, close_timeout=0.0)
        alert.on_alert(GradEvent("nonfinite", step=1), "a", "run")
        assert hook.arrived.wait(HANG_GUARD)
        alert.on_alert(GradEvent("nonfinite", step=2), "b", "run")
        alert.close()  # close_timeout=0: the queued one is dropped at once
        assert not gate.is_set(), "close() waited for the webhook's server"
        assert alert.dropped == 1


def test_a_request_the_server_does_not_answer_fails_after_timeout() -> None:
    gate = threading.Event()
    with Hook(gate=gate).running() as hook, held(gate), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alert = WebhookAlert(hook.url, retries=0, timeout=0.2, close_timeout=HANG_GUARD * 10)
        alert.on_alert(GradEvent("nonfinite", step=1), "a", "run")
        alert.close()  # returns once the sender gave up on the request
        assert not gate.is_set(), "the sender waited for the server beyond its timeout"
    assert (alert.sent, alert.failed, alert.dropped) == (0, 1, 1)
    assert [str(w.message) for w in caught if "(TimeoutError)" in str(w.message)] != []


def test_the_sender_is_a_daemon_thread_by_name() -> None:
    gate = threading.Event()
    with Hook(gate=gate).running() as hook, held(gate):
        alert = WebhookAlert(hook.url, close_timeout=HANG_GUARD)
        before = set(threading.enumerate())
        alert.on_alert(GradEvent("nonfinite", step=1), "a", "run")
        assert hook.arrived.wait(HANG_GUARD)
        (sender,) = [t for t in set(threading.enumerate()) - before if t.name == "gradguard-webhook"]
        assert sender.daemon  # a run that ends never waits for it (close() is called at exit)
        gate.set()
        alert.close()
    assert not sender.is_alive()  # close() stopped it: it does not linger to the end of the process


class _Headers(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Headers.seen.append((self.command, self.headers.get("Content-Type")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_each_alert_is_a_json_post() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        alert = WebhookAlert(f"http://127.0.0.1:{server.server_address[1]}/hook", close_timeout=HANG_GUARD)
        alert.on_alert(GradEvent("nonfinite", step=1), "a", "run")
        alert.close()
    finally:
        server.shutdown()
        server.server_close()
    assert _Headers.seen == [("POST", "application/json")] and alert.sent == 1


def test_a_closed_notifier_starts_again_on_the_next_alert() -> None:
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url, close_timeout=HANG_GUARD)
        for step in (1, 2):
            alert.on_alert(GradEvent("nonfinite", step=step), "m", "run")
            alert.close()  # its sender has sent and stopped
    assert [p["event"]["step"] for p in hook.posts] == [1, 2]
    assert (alert.sent, alert.dropped) == (2, 0)


def test_a_copy_for_another_process_keeps_the_settings_and_works_on_its_own() -> None:
    gate = threading.Event()
    with Hook(gate=gate).running() as hook:
        alert = WebhookAlert(hook.url, run_name="r", retries=0, timeout=HANG_GUARD, max_queue=1,
                             close_timeout=HANG_GUARD)  # fmt: skip
        alert.on_alert(GradEvent("nonfinite", step=1), "a", "run")  # its sender thread is running
        assert hook.arrived.wait(HANG_GUARD)
        copy = pickle.loads(pickle.dumps(alert))
        assert (copy.run_name, copy.retries, copy.timeout, copy.max_queue, copy.close_timeout) == (
            "r", 0, HANG_GUARD, 1, HANG_GUARD
        )
        assert repr(copy) == repr(alert)
        hook.arrived.clear()
        for step in (2, 3, 4):  # the copy's own sender takes the first, its queue (1) the next, one dropped
            copy.on_alert(GradEvent("nonfinite", step=step), "b", "run")
            if step == 2:
                assert hook.arrived.wait(HANG_GUARD)
        assert copy.dropped == 1 and alert.dropped == 0
        gate.set()
        copy.close()
        alert.close()
    assert sorted(p["event"]["step"] for p in hook.posts) == [1, 2, 3]
    assert (alert.sent, copy.sent) == (1, 2)


# ------------------------------------------------------------------ construction
def test_the_url_comes_from_the_argument_or_the_environment_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    with Hook().running() as hook:
        monkeypatch.setenv("GRADGUARD_WEBHOOK_URL", f"  {hook.url}\n")
        from_env = WebhookAlert(close_timeout=HANG_GUARD)
        monkeypatch.setenv("MY_HOOK", hook.url)
        named = WebhookAlert(url_env="MY_HOOK", close_timeout=HANG_GUARD)
        given = WebhookAlert(f" {hook.url} ", url_env=None, close_timeout=HANG_GUARD)
        for step, alert in enumerate((from_env, named, given)):
            alert.on_alert(GradEvent("nonfinite", step=step), "m", "run")
            alert.close()
    assert [p["event"]["step"] for p in hook.posts] == [0, 1, 2]
    assert (given.sent, given.failed) == (1, 0)


def test_the_defaults() -> None:
    alert = WebhookAlert("https://hooks.example.com/x")
    assert (alert.run_name, alert.timeout, alert.retries, alert.max_queue, alert.close_timeout) == (
        None, 5.0, 2, 100, 5.0
    )
    assert (alert.sent, alert.dropped, alert.failed) == (0, 0, 0)


@pytest.mark.parametrize(("url", "url_env", "env", "exc", "message"), [
    (None, None, None, ValueError,
     "Expected `url`, or the environment variable `None` (`url_env`), to hold the webhook's URL, but got neither."),
    (None, "MY_HOOK", "", ValueError,
     "Expected `url`, or the environment variable `MY_HOOK` (`url_env`), to hold the webhook's URL, but got "
     "neither."),
    (3, None, None, TypeError, "Expected `url` to be a string, but got int."),
    ("ftp://example.com/x", None, None, ValueError,
     "Expected `url` to be an http(s) URL such as 'https://hooks.slack.com/services/...', but got a value without "
     "'http://' or 'https://'."),
    ("https:///x", None, None, ValueError,
     "Expected `url` to name a host, such as 'https://hooks.slack.com/...', but got none."),
])  # fmt: skip
def test_a_bad_url_is_refused_with_a_message_that_never_quotes_it(
    monkeypatch: pytest.MonkeyPatch, url: object, url_env: str | None, env: str | None, exc: type[Exception],
    message: str,
) -> None:
    if env is not None:
        monkeypatch.setenv(str(url_env), env)
    with pytest.raises(exc) as info:
        WebhookAlert(url, url_env=url_env)  # type: ignore[arg-type]
    assert str(info.value) == message


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"timeout": 0.0}, "`timeout` to be a number > 0"),
    ({"retries": -1}, "`retries` to be an int >= 0"),
    ({"max_queue": 0}, "`max_queue` to be an int >= 1"),
    ({"close_timeout": -1.0}, "`close_timeout` to be a number >= 0"),
])  # fmt: skip
def test_arguments_out_of_range_are_refused_by_name(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WebhookAlert("https://hooks.example.com/x", **kwargs)  # type: ignore[arg-type]


def test_the_smallest_arguments_in_range_are_taken() -> None:
    alert = WebhookAlert("https://hooks.example.com/x", timeout=1e-3, retries=0, max_queue=1, close_timeout=0.0)
    assert (alert.timeout, alert.retries, alert.max_queue, alert.close_timeout) == (1e-3, 0, 1, 0.0)
