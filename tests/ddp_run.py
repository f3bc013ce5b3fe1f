"""Run by tests/integrations/test_ddp.py as a script: Lightning's DDP launcher re-executes it once per rank.

Usage: python tests/ddp_run.py OUTDIR [policy]
Each rank writes OUTDIR/rank<r>.json (its guard's counters, events, reported norms and the reference
norms of the gradients it saw) and OUTDIR/state<r>.pt (the weights and optimizer state before and after
every step, compared bit for bit across ranks by the test).

Under ``skip`` the run also has faults that only the guard's flag reduction keeps in step, because
each rank's *loss* differs while DDP's all-reduce leaves the gradients the same on both ranks: on rank
1 only, a finite loss spike (``skip_spikes``) at step 6, a NaN loss whose gradients are finite at step
7, and a loss spike at steps 9 and 10 (``Rollback(spike_zscore=..., spike_patience=2)``: a rollback).
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
from torch import Tensor

from lightning_gradguard import GradGuard, NonFiniteGradientError, Rollback, ZClip
from tests.helpers import FaultNet, leave_when_written, trainer


class RankFaultNet(FaultNet):
    """Faults that happen on one rank only."""

    def __init__(self, rank_faults: dict[int, dict[int, tuple[Any, ...]]]) -> None:
        super().__init__()
        self.rank_faults = rank_faults

    def fault(self) -> tuple[Any, ...] | None:
        return self.rank_faults.get(self.global_rank, {}).get(self.trainer.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        f = self.fault()
        if f is not None and f[0] == "loss_only":  # a constant added: the loss changes, its gradients do not
            loss = loss + torch.full_like(loss, f[1])
        return loss  # type: ignore[no-any-return]


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


def reference_norm(grads: list[Tensor]) -> float:
    """``torch.nn.utils.clip_grad_norm_`` on copies (``max_norm=inf``: nothing clipped, the norm returned)."""
    holders = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for holder, g in zip(holders, grads, strict=True):
        holder.grad = g.clone()
    return float(torch.nn.utils.clip_grad_norm_(holders, max_norm=math.inf))


class NormCheck(pl.Callback):
    """Listed before the guard: the reference norms of the gradients the guard is about to see.

    Per step: the total norm by ``clip_grad_norm_`` and the per-layer norms by ``vector_norm``, of the
    gradients in ``p.grad`` (after DDP's all-reduce); and, independently of DDP, each rank's own gradient
    of its own batch (``torch.autograd.grad`` on the unwrapped module, which DDP's reducer does not see),
    gathered from every rank and averaged: the gradient the optimizer is meant to get. Also this rank's
    loss, as the guard observed it.
    """

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.losses: dict[int, float] = {}
        self.batch: tuple[Any, int] | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batch = (batch, batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        self.losses[trainer.global_step] = float(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        assert self.batch is not None
        named = list(pl_module.named_parameters())
        seen = [p.grad.detach().clone() for _, p in named]
        layers: dict[str, list[Tensor]] = {}
        for (name, _), g in zip(named, seen, strict=True):
            layers.setdefault(name.rsplit(".", 1)[0], []).append(g.flatten())
        with torch.enable_grad():
            local = torch.autograd.grad(pl_module.training_step(*self.batch), [p for _, p in named])
        mine = torch.cat([g.flatten() for g in local])
        every = [torch.empty_like(mine) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(every, mine)
        averaged = torch.stack(every).mean(0)
        flat = torch.cat([g.flatten() for g in seen])
        self.rows[trainer.global_step] = {
            "total": reference_norm(seen),
            "layers": {n: float(torch.linalg.vector_norm(torch.cat(gs))) for n, gs in layers.items()},
            "averaged_total": float(torch.linalg.vector_norm(averaged)),
            # the largest difference between p.grad and the averaged local gradients, relative to the largest entry
            "grad_vs_averaged": float((flat - averaged).abs().max() / averaged.abs().max()),
        }


class CoefRecorder(pl.Callback):
    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.coefs: list[list[float]] = []
        self.deferred: list[int] = []  # steps whose read waited (skipped on the device, or warn)
        self.norms: dict[int, dict[str, float]] = {}  # the guard's reported total and per-layer norms

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        report = self.guard.last_report
        if report is not None and report.deferred:
            self.deferred.append(report.step)
        if report is not None and report.metrics:
            m = report.metrics
            self.coefs.append([m.get("gradguard/clip_coef", 1.0), m.get("gradguard/clip_threshold", -1.0)])
            keys = [k for k in m if k == "gradguard/total_norm" or k.startswith("gradguard/layer/")]
            self.norms[report.step] = {k: m[k] for k in keys}


SPIKE_Z = 1000.0  # far above the natural z-scores of a 3-step warm-up; a loss raised by 1e6 is far above it


def main() -> None:
    out = Path(sys.argv[1])
    policy = sys.argv[2] if len(sys.argv) > 2 else "skip"
    faults: dict[int, dict[int, tuple[Any, ...]]] = {1: {2: ("loss", math.nan)}, 0: {4: ("grad", 1, math.nan)}}
    if policy == "skip":  # rank 1's loss alone: a spike, a NaN with finite gradients, a spike twice (rollback)
        faults[1].update({6: ("loss_only", 1e6), 7: ("loss_only", math.nan), 9: ("loss_only", 1e6),
                          10: ("loss_only", 1e6)})  # fmt: skip
    model = RankFaultNet(faults)
    if policy == "skip":
        rollback = Rollback(every=2, keep=2, spike_zscore=SPIKE_Z, spike_patience=2, skip_file=False)
        guard = RecordingGuard(skip_spikes=SPIKE_Z, spike_warmup=3, spike_zscore=None, rollback=rollback)
    elif policy == "detect":  # detection under DDP: events on every rank, told once by rank zero

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
    norms, coefs = NormCheck(), CoefRecorder(guard)
    steps = 12 if policy == "skip" else 6
    t = trainer([norms, guard, coefs], steps=steps, strategy="ddp", devices=2, use_distributed_sampler=True)
    t.fit(model)
    rank = t.global_rank
    clip_state = guard.core.clip.state_dict() if guard.core.clip is not None else {}
    result = {
        "rank": rank,
        "global_step": t.global_step,
        "skipped": guard.skipped_steps,
        "nonfinite": guard.nonfinite_steps,
        "events": [(e.kind, e.step, e.origin, list(e.layers), e.action) for e in guard.events],
        # everything an event says, for comparing the ranks' events whole
        "full_events": [
            [e.kind, e.step, e.origin, list(e.layers), e.action, e.value, e.message, e.extra] for e in guard.events
        ],
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "losses": {str(k): v for k, v in norms.losses.items()},
        "reference": {str(k): v for k, v in norms.rows.items()},
        "reported": {str(k): v for k, v in coefs.norms.items()},
        "coefs": coefs.coefs,
        "deferred": coefs.deferred,
        "clip_state": {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in clip_state.items()},
    }
    # the weights and optimizer state before (on_train_batch_start) and after (on_train_batch_end) each step
    torch.save({"before": model.snapshots, "after": model.after}, out / f"state{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    leave_when_written(rank, [out / "rank1.json"])


if __name__ == "__main__":
    main()
