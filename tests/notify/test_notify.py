"""Alerts that reach a person: a webhook (against a real HTTP server on 127.0.0.1) and W&B alerts."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
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

from lightning_gradguard import GradEvent, GradGuard, GradGuardWarning, GuardCore, WandbAlert, WebhookAlert
from tests.helpers import FaultNet, trainer

SECRET = "T0123/B0456/very-secret-token"


class Hook:
    """A webhook endpoint on 127.0.0.1 that records every POST; ``status`` and ``delay`` shape its answers."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status, self.delay = status, delay
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(hook.delay)
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


@pytest.mark.parametrize(("status", "delay"), [(500, 0.0), (200, 3.0)])
def test_a_failing_or_hanging_server_costs_training_only_the_queue_put(
    status: int, delay: float, caplog: pytest.LogCaptureFixture
) -> None:
    with Hook(status, delay).running() as hook:
        alert = WebhookAlert(hook.url, timeout=0.3, retries=1, max_queue=4, close_timeout=0.2)
        event = GradEvent("nonfinite", step=1, message="NaN")
        costs = []
        for _ in range(20):
            start = time.perf_counter()
            alert.on_alert(event, "NaN", "run")
            costs.append(time.perf_counter() - start)
        assert max(costs) < 0.05  # the step's extra time: a queue put, never the request
        guard = GradGuard(alert_handlers=[alert], log_every_n_steps=1)
        with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
            _fit(guard, {2: ("loss", math.nan)}, 6)  # the run completes
            alert.close(0.5)
            deadline = time.monotonic() + 10  # the sender thread logs its first failure when it gets there
            while not any("webhook" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
    assert guard.steps == 6 and alert.sent == 0 and alert.dropped >= 20 - 4
    failures = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert len(failures) == 1 and SECRET not in failures[0]  # said once, without the URL


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
