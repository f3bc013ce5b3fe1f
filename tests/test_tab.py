"""The GradGuard tab in TensorBoard, its data, and the images of recurrent models."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip
from tests.helpers import trainer
from tests.test_dashboard import SeqNet


def fit_seqnet(logdir: Path, name: str, steps: int, nan_step: int | None = None, **kw: Any) -> GradGuard:
    guard = GradGuard(clip=NormClip(0.5), log_every_n_steps=1, **kw)
    logger = TensorBoardLogger(logdir, name=name, version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=steps, logger=logger, log_every_n_steps=1).fit(SeqNet(nan_step))
    return guard


def image_steps(run: Path) -> dict[str, list[int]]:
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_an_lstm_run_logging_every_step_has_both_images(tmp_path: Path) -> None:
    guard = fit_seqnet(tmp_path, "lstm", steps=12)  # images drawn in the background, within the budget
    steps = image_steps(tmp_path / "lstm")
    assert set(steps) == {"gradguard/flow", "gradguard/timestep/rnn"}
    # one render job per logging step: a step drawn has both images; the last step is always drawn
    assert steps["gradguard/flow"] == steps["gradguard/timestep/rnn"]
    assert steps["gradguard/flow"][-1] == 11 and steps["gradguard/flow"][0] == 0
    assert guard.sink.renderer.rendered == len(steps["gradguard/flow"])


def test_images_false_draws_no_image_but_logs_the_data(tmp_path: Path) -> None:
    guard = fit_seqnet(tmp_path, "noimg", steps=4, images=False)
    assert image_steps(tmp_path / "noimg") == {}
    assert guard.sink.renderer.rendered == 0 and guard.last_report is not None and guard.last_report.metrics
