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


def _autoclip_reference(norms: list[float], percentile: float, history: int) -> list[tuple[float, float]]:
    """Seetharaman et al. (2020), Algorithm 1, over a window: the threshold is the percentile (linear
    interpolation, numpy's default) of the last ``history`` norms, the current one included; the
    coefficient is clip_grad_norm_'s, max_norm / (norm + 1e-6), capped at 1."""
    import numpy as np

    out = []
    for i, g in enumerate(norms):
        window = norms[max(0, i + 1 - history) : i + 1]
        threshold = float(np.percentile(window, percentile))
        out.append((min(1.0, threshold / (g + 1e-6)), threshold))
    return out


def _zclip_reference(norms: list[float], alpha: float, z: float, warmup: int) -> list[tuple[float, float]]:
    """Kumar et al. (2025), the authors' zscore mode with adaptive scaling: a warm-up of ``warmup``
    norms (mean and population variance), then z = (g - μ)/(σ + 1e-6); a spike (z > z_threshold) is
    clipped to μ + (z_threshold²/z)·σ; μ, σ² follow the clipped norm by an EMA. The threshold logged is
    μ + z_threshold·(σ + 1e-6) from the statistics before the step (inf during the warm-up)."""
    buf: list[float] = []
    mean = var = math.nan
    out = []
    for g in norms:
        if len(buf) < warmup:
            out.append((1.0, math.inf))
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((b - mean) ** 2 for b in buf) / warmup
            continue
        std = math.sqrt(var)
        score = (g - mean) / (std + 1e-6)
        applied = mean + (z * z / score) * std if score > z else g
        out.append((applied / (g + 1e-6) if g > applied else 1.0, mean + z * (std + 1e-6)))
        mean = alpha * mean + (1 - alpha) * applied
        var = alpha * var + (1 - alpha) * (applied - mean) ** 2
    return out


@pytest.mark.parametrize("name", ["autoclip", "zclip"])
def test_adaptive_thresholds_under_lightning_equal_the_papers_rules(name: str) -> None:
    """Every step's logged threshold and clip coefficient equal the paper's rule applied to the
    pre-clip total norms (recorded by a callback before the guard, from ``.grad``)."""
    clip = AutoClip(percentile=50.0, history=4) if name == "autoclip" else ZClip(alpha=0.9, z_threshold=2.0,
                                                                                warmup_steps=3)  # fmt: skip
    before, guard = GradRecorder(), GradGuard(clip=clip, log_every_n_steps=1)
    recorder = ClipRecorder(guard)
    trainer([before, guard, recorder], steps=10).fit(FaultNet({6: ("loss", 30.0), 8: ("loss", 10.0)}))
    norms = [float(torch.nn.utils.get_total_norm([g.double() for g in before.grads[s] if g is not None]))
             for s in range(10)]  # fmt: skip
    auto = name == "autoclip"
    expected = _autoclip_reference(norms, 50.0, 4) if auto else _zclip_reference(norms, 0.9, 2.0, 3)
    got = [recorder.rows[s] for s in range(10)]
    assert [c < 1.0 for c, _ in got] == [c < 1.0 for c, _ in expected]  # which steps were clipped: exactly
    assert sum(c < 1.0 for c, _ in got) >= 2  # the spikes at steps 6 and 8, at least
    for step, ((coef, threshold), (ref_coef, ref_threshold)) in enumerate(zip(got, expected, strict=True)):
        assert coef == pytest.approx(ref_coef, rel=1e-5), step  # float32 norms against float64 ones
        assert threshold == pytest.approx(ref_threshold, rel=1e-5), step
