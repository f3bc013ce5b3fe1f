"""Writes the fixtures of the 0.3.0 checkpoint format (before the guard's state went by component).

Run once with the version whose format must keep loading (it was run with 0.3.0, commit 3ba84c9)::

    .venv/bin/python tests/data/make_checkpoint_0_3.py

The same fault-injected 50-step run as ``make_checkpoint.py`` (0.2.0's), with every stateful part of
0.3.0 in use besides: a rollback (its counters, skip list and learning-rate backoff), the device spike
statistics (``skip_spikes`` at a threshold no step reaches, so that they are kept but never skip),
update tracking, and the empty-step counter's absence. It keeps the Lightning checkpoint written after
step 24, and what the uninterrupted run decided on steps 24..49; the test resumes from that checkpoint
with today's code and must decide the same.
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

from lightning_gradguard import GradGuard, GradGuardWarning, Rollback, ZClip, __version__  # noqa: E402
from tests.data.make_checkpoint import RESUME_AT, STEPS, DecisionRecorder, OneBatchNet, decisions  # noqa: E402
from tests.helpers import trainer  # noqa: E402

CKPT = HERE / "gradguard-0.3.0-step24.ckpt"
EXPECTED = HERE / "gradguard-0.3.0-continuation.json"
# Finite loss spikes (ZClip, the spike detector), NaN losses in pairs (each pair a rollback), a NaN
# gradient at l1 (a skip).
# The rollback at step 12 (to the snapshot of step 8) puts the snapshots every 4 steps on 16, 20, 24:
# the resumed run's first snapshot (the first step after a resume) falls where the uninterrupted
# run's did, so that the second rollback (step 36) goes to the same snapshot (32) in both.
FAULTS: dict[int, tuple[Any, ...]] = {
    11: ("loss", math.nan),
    12: ("loss", math.nan),
    13: ("loss", 40.0),
    18: ("grad", 1, math.nan),
    30: ("loss", 30.0),
    35: ("loss", math.nan),
    36: ("loss", math.nan),
    41: ("loss", 50.0),
    44: ("grad", 1, math.nan),
}


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
        skip_spikes=1e4,
        rollback=Rollback(every=4, keep=2, nonfinite_losses=2, lr_backoff=0.5, skip_file=False),
        track_updates=True,
    )


def run(steps: int, ckpt_in: Path | None = None, ckpt_dir: Path | None = None) -> tuple[GradGuard, Any]:
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
