"""The TensorBoard dashboard and `gradguard report`, end to end with the real components."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip
from lightning_gradguard.cli import main as report_main
from tests.helpers import get_json, poison, tensorboard_server, trainer

ROOT = Path(__file__).resolve().parents[2]


class SeqNet(pl.LightningModule):
    """embed -> LSTM -> head; a NaN gradient is injected at `head` on step `nan_step`."""

    def __init__(self, nan_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.nan_step = nan_step

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.rnn(self.embed(x))[0][:, -1])
        if self.nan_step is not None and self._trainer is not None and self.trainer.global_step == self.nan_step:
            out = poison(out, math.nan)
        return out  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 12, 3, generator=g), torch.randn(64, 1, generator=g)), 8)


def run(logdir: Path, name: str, nan_step: int | None, steps: int = 12, **kw: Any) -> GradGuard:
    guard = GradGuard(clip=NormClip(0.5), log_every_n_steps=2, images_in_background=False, **kw)
    logger = TensorBoardLogger(logdir, name=name, version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=steps, logger=logger, log_every_n_steps=2).fit(SeqNet(nan_step))
    return guard


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradGuard, GradGuard]:
    root = tmp_path_factory.mktemp("tb")
    faulty = run(root, "faulty", nan_step=5, log_histograms=True)
    healthy = run(root, "healthy", nan_step=None)
    return root, faulty, healthy


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = report_main(["report", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_report_numbers_match_the_run(logs: tuple[Path, GradGuard, GradGuard], capsys: Any) -> None:
    root, faulty, _ = logs
    code, (rep,) = report_json(capsys, str(root / "faulty"))
    assert code == 1  # a non-finite step
    last = faulty.last_report
    assert last is not None and last.logged
    for layer, value in last.layer_norms.items():
        assert rep["layers"][layer]["last"] == pytest.approx(value, rel=1e-6)
    assert rep["layer_order"] == ["embed", "rnn.l0", "head"]
    assert rep["nonfinite"] == [{"step": 5, "origin": "head", "action": "skipped", "layers": "embed,rnn.l0,head"}]
    assert rep["skipped_steps"] == faulty.skipped_steps == 1
    assert rep["timesteps"]["rnn"]["horizon"] == pytest.approx(faulty.core.timestep_summaries["rnn"]["horizon"])
    profile = faulty.timestep_norms["rnn"].tolist()
    assert rep["profiles"]["rnn"] == pytest.approx(profile, rel=1e-6)
    assert "unhealthy" in rep["verdict"]


def test_report_text_healthy_and_fail_on(logs: tuple[Path, GradGuard, GradGuard], capsys: Any, tmp_path: Path) -> None:
    root, _, _ = logs
    assert report_main(["report", str(root / "healthy")]) == 0
    text = capsys.readouterr().out
    assert "verdict: healthy" in text and "rnn.l0" in text and "timesteps 'rnn'" in text
    assert report_main(["report", str(root), "--png", str(tmp_path / "h.png")]) == 1  # both runs; one faulty
    assert (tmp_path / "h.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert out.count("== ") == 2
    # --fail-on: a finite run whose alerts hold `exploding` passes unless --fail-on names it
    run(tmp_path / "flag", "flagged", nan_step=None, explode_threshold=1e-9)
    flagged = str(tmp_path / "flag" / "flagged")
    assert report_main(["report", flagged]) == 0
    assert report_main(["report", flagged, "--fail-on", "spike"]) == 0
    assert report_main(["report", flagged, "--fail-on", "exploding", "spike"]) == 1
    capsys.readouterr()


def test_report_usage_errors(tmp_path: Path, capsys: Any) -> None:
    def error_of(*args: str) -> str:
        assert report_main(["report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert "no such directory" in error_of(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no TensorBoard event files" in error_of(str(tmp_path / "empty"))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.out.tfevents.1.host").write_bytes(os.urandom(200))
    assert "corrupt" in error_of(str(garbage))
    other = tmp_path / "other"
    writer_logger = TensorBoardLogger(other, name="", version="")
    writer_logger.log_metrics({"loss": 1.0}, step=0)
    writer_logger.finalize("success")
    assert "no gradguard/ metrics" in error_of(str(other))
    assert report_main(["report"]) == 2  # argparse usage error
    capsys.readouterr()


def test_truncated_event_file_is_a_usage_error(logs: tuple[Path, GradGuard, GradGuard], tmp_path: Path) -> None:
    root, _, _ = logs
    (src,) = list((root / "healthy").glob("events.out.tfevents.*"))
    cut = tmp_path / "cut"
    cut.mkdir()
    data = src.read_bytes()
    (cut / src.name).write_bytes(data[: len(data) - 37])
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gradguard", "report", str(cut)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_is_installed(logs: tuple[Path, GradGuard, GradGuard]) -> None:
    root, _, _ = logs
    script = Path(sys.executable).with_name("gradguard")
    assert script.exists(), "pip install -e . installs the `gradguard` console script"
    proc = subprocess.run([str(script), "report", str(root / "healthy")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "verdict: healthy" in proc.stdout


def test_tensorboard_serves_the_dashboard(logs: tuple[Path, GradGuard, GradGuard]) -> None:
    root, _, _ = logs

    def ready(base: str) -> bool:
        scalars = get_json(f"{base}/data/plugin/scalars/tags")
        return "faulty" in scalars and "gradguard/total_norm" in scalars["faulty"]

    with tensorboard_server(root, ready) as server:
        base = f"{server}/data/plugin"
        scalars = get_json(f"{base}/scalars/tags")
        assert "gradguard/total_norm" in scalars["faulty"], scalars
        assert {"gradguard/layer/rnn.l0", "gradguard/timestep/rnn/horizon", "gradguard/clip_threshold"} <= set(
            scalars["faulty"]
        )
        layout = get_json(f"{base}/custom_scalars/layout")
        (category,) = [c for c in layout["category"] if c["title"] == "GradGuard"]
        titles = [chart["title"] for chart in category["chart"]]
        assert "per-layer norms" in titles and any("total norm" in t for t in titles)
        images = get_json(f"{base}/images/tags")
        assert {"gradguard/flow", "gradguard/timestep/rnn"} <= set(images["faulty"])
        texts = get_json(f"{base}/text/tags")
        assert {"gradguard/alerts/text_summary", "gradguard/nonfinite/text_summary"} <= set(texts["faulty"])
        hist = get_json(f"{base}/histograms/tags")
        assert "gradguard/hist/head" in hist["faulty"]
