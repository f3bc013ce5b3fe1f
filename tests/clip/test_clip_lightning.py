"""Clippers inside Lightning: metrics, ordering with other callbacks, and resume determinism."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_gradguard import AGC, AutoClip, GradGuard, GradGuardWarning, LayerNormClip, NormClip, ZClip
from tests.helpers import FaultNet, GradRecorder, MemoryLogger, assert_same_state, loader, trainer


class ClipRecorder(pl.Callback):
    """Listed after the guard: records each step's clip decision from the guard's report."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.rows: dict[int, tuple[float, float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        report = self.guard.last_report
        assert report is not None
        m = report.metrics
        self.rows[trainer.global_step] = (m["gradguard/clip_coef"], m.get("gradguard/clip_threshold", math.nan))


# Finite loss spikes (x30) give ZClip something to clip; a NaN step must not enter its statistics.
FAULTS: dict[int, tuple[Any, ...]] = {30: ("loss", 30.0), 35: ("grad", 1, math.nan), 41: ("loss", 50.0)}


class OneBatchNet(FaultNet):
    """One batch per epoch: an end-of-epoch checkpoint after every step, so that resuming replays
    exactly the batches an uninterrupted run sees (Lightning restarts a partly-seen epoch)."""

    def train_dataloader(self) -> Any:
        return loader(n=8, batch=8)


def run(clip_factory: Any, steps: int, ckpt_in: Path | None = None, ckpt_dir: Path | None = None) -> tuple[Any, ...]:
    guard = GradGuard(clip=clip_factory(), log_every_n_steps=1, max_consecutive_skips=5)
    recorder = ClipRecorder(guard)
    model = OneBatchNet(FAULTS, lr=0.05)
    callbacks: list[pl.Callback] = [guard, recorder]
    if ckpt_dir is not None:  # a checkpoint at the end of every epoch (8 steps), as a real run keeps
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)  # the NaN step's alert
        t = trainer(callbacks, steps=steps, enable_checkpointing=ckpt_dir is not None)
        t.fit(model, ckpt_path=ckpt_in)
    return guard, recorder, model


@pytest.mark.parametrize(
    "clip_factory",
    [lambda: ZClip(warmup_steps=10, z_threshold=2.0), lambda: AutoClip(percentile=25.0, history=16)],
    ids=["zclip", "autoclip"],
)
def test_resume_makes_identical_clipping_decisions(tmp_path: Path, clip_factory: Any) -> None:
    full_guard, full_rec, full_model = run(clip_factory, 50, ckpt_dir=tmp_path)
    ckpt = tmp_path / "epoch=23-step=24.ckpt"  # as if the run had died during step 25
    resumed_guard, resumed_rec, resumed_model = run(clip_factory, 50, ckpt_in=ckpt)
    assert sorted(resumed_rec.rows) == list(range(24, 50))
    for step in range(24, 50):
        assert resumed_rec.rows[step] == pytest.approx(full_rec.rows[step], rel=0, abs=0, nan_ok=True), step
    assert_same_state(resumed_model.state_dict(), full_model.state_dict())
    assert_same_state(resumed_guard.core.clip.state_dict(), full_guard.core.clip.state_dict())
    assert resumed_guard.skipped_steps == full_guard.skipped_steps == 1
    assert resumed_guard.core.clipped_steps == full_guard.core.clipped_steps > 0
    spikes = [full_rec.rows[s][0] for s in (30, 41)]
    assert all(c < 1.0 for c in spikes)
    clone = pickle.loads(pickle.dumps(full_guard))
    assert_same_state(clone.core.clip.state_dict(), full_guard.core.clip.state_dict())


def test_callbacks_after_the_guard_see_clipped_gradients() -> None:
    before, after = GradRecorder(), GradRecorder()
    guard = GradGuard(clip=NormClip(0.01), log_every_n_steps=1)
    trainer([before, guard, after], steps=3).fit(FaultNet())
    for step in range(3):
        b = torch.nn.utils.get_total_norm([g for g in before.grads[step] if g is not None])
        a = torch.nn.utils.get_total_norm([g for g in after.grads[step] if g is not None])
        assert b > 0.01 and a == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize(
    ("clip", "threshold", "units"),
    [
        (NormClip(0.05), 0.05, None),
        (LayerNormClip(0.05), 0.05, (0, 3)),
        (AGC(0.001), 0.001, (0, 8 + 8 + 1 + 3)),
        (AutoClip(50.0), None, None),
        (ZClip(warmup_steps=2), None, None),
    ],
    ids=["norm", "layer", "agc", "autoclip", "zclip"],
)
def test_clip_metrics_are_logged(clip: Any, threshold: float | None, units: tuple[int, int] | None) -> None:
    logger = MemoryLogger()
    guard = GradGuard(clip=clip, log_every_n_steps=2)
    trainer([guard], steps=6, logger=logger, log_every_n_steps=2).fit(FaultNet())
    thresholds = logger.series("gradguard/clip_threshold")
    fractions = logger.series("gradguard/clipped_fraction")
    assert len(fractions) == 3 and all(0.0 <= f <= 1.0 for f in fractions.values())
    if threshold is not None:
        assert all(v == pytest.approx(threshold) for v in thresholds.values()) and thresholds
    if units is not None:
        counts = logger.series("gradguard/clipped_units")
        assert counts and all(units[0] <= c <= units[1] for c in counts.values())
    # the fraction is the share of the steps since the last log that were clipped
    assert sum(fractions.values()) * 2 == pytest.approx(guard.core.clipped_steps)
