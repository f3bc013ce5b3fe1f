"""Alerts that reach a person: a webhook (against a real HTTP server on 127.0.0.1) and W&B alerts."""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.plugins import MixedPrecision

from lightning_gradguard import GradEvent, GradGuard, GradGuardWarning, GuardCore, WandbAlert, WebhookAlert
from tests.helpers import FaultNet, trainer

SECRET = "T0123/B0456/very-secret-token"


class Hook:
    """A webhook endpoint on 127.0.0.1 that records every POST and answers ``status``.

    With a ``gate``, each request is held until the test sets it: ``arrived`` says that the first one
    is in the server's hands (an event to wait on, never a sleep)."""

    def __init__(self, status: int = 200, gate: threading.Event | None = None) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status, self.gate = status, gate
        self.arrived = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.arrived.set()
                if hook.gate is not None:
                    hook.gate.wait()
                hook.posts.append(json.loads(body))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/{SECRET}"

    @contextmanager
    def running(self) -> Iterator[Hook]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def _fit(guard: GradGuard, faults: dict[int, Any], steps: int, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard, *kw.pop("callbacks", [])], steps=steps, **kw).fit(FaultNet(faults))


def test_a_nan_step_posts_exactly_one_message(tmp_path: Path) -> None:
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url)
        logger = TensorBoardLogger(tmp_path, name="nightly", version="3")
        _fit(GradGuard(alert_handlers=[alert]), {3: ("grad", 1, math.nan)}, 8, logger=logger)
    assert len(hook.posts) == 1 and alert.sent == 1 and alert.dropped == 0
    (post,) = hook.posts
    assert post["run"] == "nightly/3"
    assert post["text"].startswith("[nightly/3] step 3: GradGuard: non-finite gradient at step 3")
    assert post["event"]["kind"] == "nonfinite" and post["event"]["origin"] == "l1" and post["event"]["step"] == 3
    assert post["event"]["layers"] == ["l0", "l1"] and post["event"]["value"] is None  # NaN as JSON null
    assert post["event"]["action"] == "skipped"


@pytest.mark.parametrize("retries", [0, 2])
def test_a_failing_server_gets_each_alert_once_plus_every_retry_and_the_failure_is_said_once(
    retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    with Hook(500).running() as hook:
        alert = WebhookAlert(hook.url, retries=retries, timeout=60.0, close_timeout=600.0)
        with (
            caplog.at_level(logging.WARNING, logger="lightning_gradguard"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            for step in (1, 2):
                alert.on_alert(GradEvent("nonfinite", step=step, message="NaN"), "NaN", "run")
            alert.close()  # waits for the queue: when it returns, both alerts had every try
    # the server answers 500 every time: each alert is POSTed once, then `retries` more times, in order
    assert [p["event"]["step"] for p in hook.posts] == [1] * (1 + retries) + [2] * (1 + retries)
    assert (alert.sent, alert.failed, alert.dropped) == (0, 2, 2)
    failures = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert len(failures) == 1 and SECRET not in failures[0]  # said once, without the URL
    assert f"(HTTP 500) after {1 + retries} tr" in failures[0]
    assert [str(w.message) for w in caught if "webhook" in str(w.message)] == failures  # and warned once


class Recorder:
    """A notifier (``on_alert``) that records what the alert router hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_alert(self, event: GradEvent, message: str, run: str) -> None:
        self.calls.append((event.kind, event.step))


def test_routine_events_pass_the_router_but_never_reach_a_notifier() -> None:
    from lightning_gradguard.core.alerts import AlertRouter

    seen: list[GradEvent] = []
    with Hook().running() as hook:
        webhook, recorder = WebhookAlert(hook.url, close_timeout=600.0), Recorder()
        router = AlertRouter(alert_every=1, handlers=[seen.append, webhook, recorder])
        for step in range(4):
            router(GradEvent("amp_overflow", step=step, message="fp16 overflow, handled by the GradScaler"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            router(GradEvent("nonfinite", step=4, message="NaN"))  # an alarm: the notifiers are connected
        router.close()  # waits for the webhook's queue
    # every event reached the handler and passed the rate limit (alert_every=1): the logger got each ...
    assert [e.kind for e in seen] == ["amp_overflow"] * 4 + ["nonfinite"] and router.emitted == 5
    # ... and a person is told of the alarm only
    assert recorder.calls == [("nonfinite", 4)]
    assert [(p["event"]["kind"], p["event"]["step"]) for p in hook.posts] == [("nonfinite", 4)]
    assert (webhook.sent, webhook.dropped) == (1, 0)


def test_an_fp16_overflow_run_posts_its_nan_loss_and_no_overflow() -> None:
    class Overflow(FaultNet):  # fp16 overflows (the GradScaler handles them) at steps 2 and 5
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * 1e30 if self.trainer.global_step in (2, 5) else loss  # type: ignore[no-any-return]

    with Hook().running() as hook:
        webhook, recorder = WebhookAlert(hook.url, close_timeout=600.0), Recorder()
        guard = GradGuard(alert_handlers=[webhook, recorder], alert_every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            # the fit's end closes the notifiers: the webhook's queue is empty when it returns
            fp16 = MixedPrecision("16-mixed", "cpu")
            trainer([guard], steps=8, plugins=[fp16]).fit(Overflow({6: ("loss", math.nan)}))  # and a NaN loss at 6
    overflows = [e.step for e in guard.events if e.kind == "amp_overflow"]
    assert {2, 5} <= set(overflows) and guard.core.amp_overflow_steps == len(overflows)
    assert [(e.kind, e.step) for e in guard.events if e.kind != "amp_overflow"] == [("nonfinite", 6)]
    assert recorder.calls == [("nonfinite", 6)]  # the NaN loss only: an overflow is routine
    assert [(p["event"]["kind"], p["event"]["step"]) for p in hook.posts] == [("nonfinite", 6)]


def test_a_server_that_holds_every_request_never_holds_a_step() -> None:
    """The server holds each POST until the test lets it go. While it holds the first, every step of the
    guard completes: the queue takes ``max_queue`` alerts and the rest are dropped and counted. No clock
    decides: the steps are done before the server answers, or the test fails."""
    steps, max_queue = 12, 4
    gate = threading.Event()
    # Only a hang guard, not a measure: had a step waited for the server, the watchdog opens the gate
    # after 120 s so that the test ends, and `held` below is False.
    watchdog = threading.Timer(120.0, gate.set)
    watchdog.daemon = True
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Hook(gate=gate).running() as hook:
        alert = WebhookAlert(hook.url, timeout=600.0, retries=0, max_queue=max_queue, close_timeout=600.0)
        guard = GuardCore(model, alert_every=1, alert_handlers=[alert], max_consecutive_skips=1000)
        watchdog.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            for step in range(steps):  # every step is non-finite: one alert each (alert_every=1)
                model(torch.full((4, 3), math.nan)).sum().backward()
                guard.step(opt)
                if step == 0:  # the sender took the first alert off the queue: the server holds it
                    assert hook.arrived.wait(120.0)  # a hang guard
            held = not gate.is_set()  # the server has not answered yet
            gate.set()
            guard.close()  # waits for the queue
        watchdog.cancel()
    assert held, "a step waited for the webhook's server"
    assert guard.steps == steps and guard.nonfinite_steps == steps
    # the first alert in the server's hands, the next `max_queue` queued, the rest dropped and counted
    assert [p["event"]["step"] for p in hook.posts] == list(range(1 + max_queue))
    assert (alert.sent, alert.failed, alert.dropped) == (1 + max_queue, 0, steps - 1 - max_queue)


def test_fifty_nan_steps_are_rate_limited_with_counts() -> None:
    model = torch.nn.Linear(3, 1)
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url)
        guard = GuardCore(model, alert_every=10, alert_handlers=[alert], max_consecutive_skips=1000)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            for _ in range(50):
                model(torch.full((4, 3), math.nan)).sum().backward()
                guard.step(opt)
            guard.close()
    assert guard.nonfinite_steps == 50
    assert [p["event"]["step"] for p in hook.posts] == [0, 10, 20, 30, 40]
    assert all("(9 similar alerts suppressed since step" in p["text"] for p in hook.posts[1:])


def test_the_url_stays_secret(tmp_path: Path) -> None:
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url)
        guard = GradGuard(alert_handlers=[alert], dump_dir=str(tmp_path / "dumps"), log_every_n_steps=1)
        logger = TensorBoardLogger(tmp_path, name="run", version="")
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        _fit(guard, {3: ("grad", 1, math.nan)}, 6, logger=logger, callbacks=[ckpt], enable_checkpointing=True)
    assert len(hook.posts) == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".ckpt", ".pt"} <= kinds and any(p.name.startswith("events.out") for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in repr(alert) and SECRET not in repr(guard.alerts.notifiers)


def test_a_malformed_url_is_refused_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("hooks.example.com/x", "ftp://example.com/x", "https://"):
        with pytest.raises(ValueError, match="`url`") as info:
            WebhookAlert(bad)
        assert "example.com" not in str(info.value)
    monkeypatch.delenv("GRADGUARD_WEBHOOK_URL", raising=False)
    with pytest.raises(ValueError, match="GRADGUARD_WEBHOOK_URL"):
        WebhookAlert()
    monkeypatch.setenv("GRADGUARD_WEBHOOK_URL", f"https://hooks.example.com/{SECRET}")
    assert repr(WebhookAlert()) == "WebhookAlert(url=<secret>, timeout=5.0, retries=2)"
    with pytest.raises(ValueError, match="`timeout`"):
        WebhookAlert("https://hooks.example.com/x", timeout=0)


# ------------------------------------------------------------------------------ Weights & Biases
class WandbLogger(Logger):
    """A stand-in for Lightning's WandbLogger: ``wandb`` is not a dependency and is not installed
    here, and its offline mode keeps no alerts to look at, so the run's ``alert`` calls are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.alerts: list[dict[str, Any]] = []
        outer = self

        class Run:
            def alert(self, **kw: Any) -> None:
                outer.alerts.append(kw)

        self._run = Run()

    @property
    def experiment(self) -> Any:
        return self._run

    @property
    def name(self) -> str:
        return "wandb-run"

    @property
    def version(self) -> str:
        return "abc123"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_wandb_logger_gets_wandb_alerts_rate_limited() -> None:
    logger = WandbLogger()
    faults = {s: ("grad", 1, math.nan) for s in (2, 3, 4)} | {6: ("loss", math.nan)}
    guard = GradGuard(alert_every=100)
    _fit(guard, faults, 8, logger=logger)
    titles = [(a["title"], a["level"]) for a in logger.alerts]
    # the three NaN gradients at l1 are one alert (rate-limited); the NaN loss has other layers
    assert titles == [
        ("GradGuard: nonfinite at step 2 (wandb-run/abc123)", "ERROR"),
        ("GradGuard: nonfinite at step 6 (wandb-run/abc123)", "ERROR"),
    ]
    assert logger.alerts[0]["text"].startswith("GradGuard: non-finite gradient at step 2")
    assert isinstance(guard.alerts.notifiers[0], WandbAlert)


def test_an_unreachable_webhook_warns_once_and_the_summary_counts_what_was_lost() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    alert = WebhookAlert(f"http://127.0.0.1:{port}/services/{SECRET}", retries=1, timeout=1.0)
    guard = GradGuard(alert_handlers=[alert], alert_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([guard], steps=6).fit(FaultNet({2: ("grad", 1, math.nan), 4: ("loss", math.nan)}))
    failed = [str(w.message) for w in caught if "webhook" in str(w.message)]
    assert len(failed) == 1, failed  # once per notifier, not once per alert
    assert failed[0].startswith("GradGuard: a webhook alert could not be delivered (URLError) after 2 tries")
    assert SECRET not in failed[0] and issubclass(next(w for w in caught if "webhook" in str(w.message)).category,
                                                  GradGuardWarning)  # fmt: skip
    assert (alert.sent, alert.failed, alert.dropped) == (0, 2, 2)
    assert guard.summary().endswith(
        "; 2 alerts never reached a person (2 failed to send after every retry, 0 dropped: a full queue, or still "
        "queued at the end)."
    )
