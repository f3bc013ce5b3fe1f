"""Run by tests/integrations/test_rollback_distributed.py: a rollback under Lightning's own strategies on
2 CPU processes (gloo).

Usage: python tests/rollback_run.py OUTDIR MODE
MODE: ``ddp``, ``fsdp2``, ``tp`` (2 CPU processes) or ``fsdp1`` (Lightning's FSDPStrategy on every
GPU: CUDA only), with a persistent NaN gradient on the last rank only at steps 5 and 6
(max_consecutive_skips=2: a rollback at step 6); ``<mode>_limit``: the fault never ends
(max_rollbacks=1: the second trigger raises on every rank). ``ddp_transient``: DDP, a NaN gradient on
rank 1 at step 5 on the first backward only (the replay must call it transient and name rank 1).
Each rank writes OUTDIR/<mode><r>.json: its events, and the full (unsharded) weights and Adam state
before every step and right after the guard at every step.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, NonFiniteGradientError, Rollback
from tests.helpers import leave_when_written, once, parallelize, poison


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective for a DTensor


class Net(pl.LightningModule):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.l0, self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 1)
        self.fault_steps = set(range(5, 1000)) if mode.endswith("_limit") else {5, 6}

    def forward(self, x: Tensor) -> Tensor:
        out = self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))
        if self.mode == "ddp_transient":
            if self.global_rank == 1 and self.trainer.global_step == 5:
                out = once(out)
            return out  # type: ignore[no-any-return]
        if self.global_rank == self.trainer.world_size - 1 and self.trainer.global_step in self.fault_steps:
            out = poison(out, math.nan)  # a NaN gradient on the last rank only
        return out  # type: ignore[no-any-return]

    def configure_model(self) -> None:
        if self.mode.startswith(("ddp", "fsdp1")):  # FSDP1 wraps the model itself
            return
        tp = self.mode.startswith("tp")
        parallelize(self, self.device_mesh, tensor_parallel=tp, fsdp=not tp, units=[self.l0, self.l1, self.l2])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)), 8)


def state(pl_module: pl.LightningModule, optimizer: Any) -> dict[str, Any]:
    """The full weights and Adam moments (every rank calls this, in the same order). Under FSDP1 this
    rank's flat shards and their moments: the snapshot is local, and so is the comparison."""
    if type(pl_module.trainer.strategy).__name__ == "FSDPStrategy":
        model = pl_module.trainer.strategy.model
        weights = {n: p.detach().cpu().tolist() for n, p in model.named_parameters()}
        moments = [{k: v.cpu().tolist() for k, v in sorted(s.items())} for s in optimizer.state.values()]
        return {"weights": weights, "moments": moments}
    weights = {n: full(p.detach()).tolist() for n, p in pl_module.named_parameters()}
    moments = [
        {k: full(v).tolist() for k, v in sorted(optimizer.state[p].items())}
        for g in optimizer.param_groups
        for p in g["params"]
        if p in optimizer.state
    ]
    return {"weights": weights, "moments": moments}


class Before(pl.Callback):
    """Listed before the guard: the state the guard's snapshot of this step should hold."""

    def __init__(self) -> None:
        self.rows: dict[int, Any] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.rows[trainer.global_step] = state(pl_module, optimizer)


class After(pl.Callback):
    """Listed after the guard: the state right after its decision (a rollback's result)."""

    def __init__(self) -> None:
        self.rows: dict[int, Any] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.rows[trainer.global_step] = state(pl_module, optimizer)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    warnings.simplefilter("ignore")
    limit = mode.endswith("_limit")
    guard = GradGuard(
        log_every_n_steps=4, max_consecutive_skips=2,
        rollback=Rollback(every=2, keep=2, max_rollbacks=1 if limit else 3, skip_file=False),
    )  # fmt: skip
    if mode == "ddp_transient":
        guard = GradGuard(log_every_n_steps=4)
    before, after = Before(), After()
    accelerator, devices = "cpu", 2
    if mode.startswith("ddp"):
        strategy: Any = "ddp"
    elif mode.startswith("fsdp1"):
        from pytorch_lightning.strategies import FSDPStrategy

        accelerator, devices = "cuda", torch.cuda.device_count()
        strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    else:
        tp = 2 if mode.startswith("tp") else 1
        strategy = ModelParallelStrategy(data_parallel_size=2 // tp, tensor_parallel_size=tp)
    t = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=12, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[before, guard, after], num_sanity_val_steps=0,
    )  # fmt: skip
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        try:
            t.fit(Net(mode))
        except NonFiniteGradientError as exc:  # every rank gets here, or the other would hang
            error = str(exc)
    rank = t.global_rank
    result = {
        "rank": rank,
        "error": error,
        "global_step": t.global_step,
        "events": [(e.kind, e.step, e.extra.get("snapshot_step")) for e in guard.events],
        "rollbacks": guard.rollbacks,
        "replays": [e.extra["replay"] for e in guard.events if "replay" in e.extra],
        "before": {str(k): v for k, v in before.rows.items()},
        "after": {str(k): v for k, v in after.rows.items()},
    }
    (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    leave_when_written(rank, [out / f"{mode}{r}.json" for r in range(1, devices)])


if __name__ == "__main__":
    main()
