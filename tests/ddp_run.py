"""Run by tests/integrations/test_ddp.py as a script: Lightning's DDP launcher re-executes it once per rank.

Usage: python tests/ddp_run.py OUTDIR [policy]
Each rank writes OUTDIR/rank<r>.json with its guard's counters, events and a weight checksum.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch

from lightning_gradguard import GradGuard, NonFiniteGradientError, ZClip
from tests.helpers import FaultNet, leave_when_written, trainer


class RankFaultNet(FaultNet):
    """Faults that happen on one rank only."""

    def __init__(self, rank_faults: dict[int, dict[int, tuple[Any, ...]]]) -> None:
        super().__init__()
        self.rank_faults = rank_faults

    def fault(self) -> tuple[Any, ...] | None:
        return self.rank_faults.get(self.global_rank, {}).get(self.trainer.global_step)


class RecordingGuard(GradGuard):
    """Writes down a raise on this rank, then waits for the other rank at a barrier before re-raising.

    If the ranks disagreed (one raising, one stepping on), the barrier would never complete and the
    test's timeout would fail it: passing proves the decision was shared.
    """

    out: Path

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        except NonFiniteGradientError as exc:
            record = {"rank": trainer.global_rank, "step": trainer.global_step, "error": str(exc)}
            (self.out / f"raised{trainer.global_rank}.json").write_text(json.dumps(record))
            trainer.strategy.barrier("gradguard-raise")
            raise


class CoefRecorder(pl.Callback):
    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.coefs: list[list[float]] = []
        self.deferred: list[int] = []  # steps whose read waited (skipped on the device, or warn)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        report = self.guard.last_report
        if report is not None and report.deferred:
            self.deferred.append(report.step)
        if report is not None and report.metrics:
            m = report.metrics
            self.coefs.append([m.get("gradguard/clip_coef", 1.0), m.get("gradguard/clip_threshold", -1.0)])


def main() -> None:
    out = Path(sys.argv[1])
    policy = sys.argv[2] if len(sys.argv) > 2 else "skip"
    faults = {1: {2: ("loss", math.nan)}, 0: {4: ("grad", 1, math.nan)}}
    model = RankFaultNet(faults)
    if policy == "detect":  # detection under DDP: events on every rank, told once by rank zero

        def handler(event: Any) -> None:
            with (out / f"handler{t.global_rank}.txt").open("a") as fh:
                fh.write(f"{event.kind} {event.step}\n")

        guard = RecordingGuard(explode_threshold=1e-9, alert_handlers=[handler])
    elif policy == "fused":  # skipped on the device by AdamW(fused=True); flags read at logging steps 2, 5
        model.optim = "adamw_fused"
        guard = RecordingGuard(log_every_n_steps=3)
    elif policy == "zclip":  # clipping statistics under DDP: skip policy, ZClip with a short warm-up
        guard = RecordingGuard(clip=ZClip(warmup_steps=2, z_threshold=0.5), log_every_n_steps=1)
    else:
        guard = RecordingGuard(on_nonfinite=policy)  # type: ignore[arg-type]
    guard.out = out
    coefs = CoefRecorder(guard)
    t = trainer([guard, coefs], steps=6, strategy="ddp", devices=2, use_distributed_sampler=True)
    t.fit(model)
    rank = t.global_rank
    clip_state = guard.core.clip.state_dict() if guard.core.clip is not None else {}
    result = {
        "rank": rank,
        "global_step": t.global_step,
        "skipped": guard.skipped_steps,
        "nonfinite": guard.nonfinite_steps,
        "events": [(e.kind, e.step, e.origin, list(e.layers), e.action) for e in guard.events],
        "weights": float(sum(p.double().sum() for p in model.parameters())),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "coefs": coefs.coefs,
        "deferred": coefs.deferred,
        "clip_state": {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in clip_state.items()},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    leave_when_written(rank, [out / "rank1.json"])


if __name__ == "__main__":
    main()
