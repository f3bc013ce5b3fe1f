"""Writes the checkpoint-compatibility fixtures of ``tests/integrations/test_checkpoint_compat.py``.

Run once with the version whose checkpoint format must keep loading (it was run with 0.2.0)::

    .venv/bin/python tests/data/make_checkpoint.py

It trains the fault-injected MLP of ``tests/helpers.py`` for 50 steps with every stateful part of
the guard in use (ZClip, spike statistics, the exploding detector, per-layer watch, rate-limited
alerts, a NaN step), keeps the Lightning checkpoint written after step 24, and records what the
uninterrupted run decided on steps 24..49. The test resumes from that checkpoint with today's code
and must decide the same, to the bit.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lightning_gradguard import GradGuard, GradGuardWarning, ZClip, __version__  # noqa: E402
from tests.helpers import FaultNet, loader, trainer  # noqa: E402

CKPT = HERE / "gradguard-0.2.0-step24.ckpt"
EXPECTED = HERE / "gradguard-0.2.0-continuation.json"
RESUME_AT = 24
STEPS = 50
# Finite loss spikes for ZClip and the spike detector, a NaN gradient at l1, a NaN loss.
FAULTS: dict[int, tuple[Any, ...]] = {
    12: ("loss", 40.0),
    18: ("grad", 1, math.nan),
    30: ("loss", 30.0),
    35: ("grad", 1, math.nan),
    41: ("loss", 50.0),
    44: ("loss", math.nan),
}


class OneBatchNet(FaultNet):
    """One batch per epoch: a checkpoint after every step replays exactly on resume."""

    def train_dataloader(self) -> Any:
        return loader(n=8, batch=8)


def make_guard() -> GradGuard:
    return GradGuard(
        clip=ZClip(warmup_steps=10, z_threshold=2.0),
        log_every_n_steps=3,
        max_consecutive_skips=5,
        spike_zscore=2.5,
        spike_warmup=5,
        explode_threshold=3.0,
        vanish_threshold=1e-3,
        vanish_patience=2,
        alert_every=7,
    )


class DecisionRecorder(pl.Callback):
    """Listed after the guard: what it decided on each step (from its report)."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.rows: dict[int, dict[str, Any]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        report = self.guard.last_report
        assert report is not None
        self.rows[trainer.global_step] = {
            "skipped": report.skipped,
            "nonfinite": report.nonfinite,
            "event": None if report.event is None else report.event.kind,
            "metrics": dict(report.metrics),
        }


def run(steps: int, ckpt_in: Path | None = None, ckpt_dir: Path | None = None) -> tuple[GradGuard, DecisionRecorder]:
    guard = make_guard()
    recorder = DecisionRecorder(guard)
    callbacks: list[pl.Callback] = [guard, recorder]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        t = trainer(callbacks, steps=steps, enable_checkpointing=ckpt_dir is not None)
        t.fit(OneBatchNet(FAULTS, lr=0.05), ckpt_path=ckpt_in)
    return guard, recorder


def decisions(guard: GradGuard, recorder: DecisionRecorder, since: int) -> dict[str, Any]:
    """Everything observable that the guard decided from step ``since`` on, as plain JSON values."""
    events = [
        {k: v for k, v in e.as_dict().items() if k != "extra"} | {"extra": dict(e.extra)}
        for e in guard.events
        if e.step >= since
    ]
    return {
        "steps": {str(s): row for s, row in sorted(recorder.rows.items()) if s >= since},
        "events": events,
        "state": guard.state_dict(),
        "summary": guard.summary(),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard, recorder = run(STEPS, ckpt_dir=Path(tmp))
        shutil.copyfile(Path(tmp) / f"epoch={RESUME_AT - 1}-step={RESUME_AT}.ckpt", CKPT)
    expected = decisions(guard, recorder, RESUME_AT)
    expected["written_by"] = __version__
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {CKPT.name} ({CKPT.stat().st_size} bytes) and {EXPECTED.name}")


if __name__ == "__main__":
    main()
