"""Run by tests/integrations/test_checkpoints_distributed.py: the checkpoint gate under Lightning's own
strategies on 2 CPU processes (gloo), with the user's ``ModelCheckpoint`` saving every step.

Usage: python tests/checkpoint_run.py OUTDIR MODE
MODE: ``ddp`` or ``fsdp2`` (``ModelParallelStrategy``: each save a distributed checkpoint's directory),
or ``fsdp1`` (Lightning's FSDPStrategy on every GPU: CUDA only).

After the save of global step 6, rank 1 alone gets a NaN in its own copy (DDP) or shard (FSDP2) of
``l1.weight``. Its forward is NaN from then on: steps 6 and 7 are skipped on both ranks. The save of
step 7 sees the NaN on rank 1 only, and both ranks must defer it (a rank that saved alone would hang
the other in the save's collectives). Step 7's skip is the second in a row: a rollback to the
snapshot of step 4, which quarantines the checkpoints of steps 5 and 6 (written before the fault, in
the undone interval) and re-points ``last.ckpt``. The deferred save is written at step 8.
Each rank writes OUTDIR/<mode><r>.json: its events and what its gate recorded.
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
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, Rollback
from tests.helpers import leave_when_written, parallelize


class Net(pl.LightningModule):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.l0, self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 1)

    def configure_model(self) -> None:
        if self.mode == "fsdp2":
            parallelize(self, self.device_mesh, tensor_parallel=False, fsdp=True, units=[self.l0, self.l1, self.l2])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x))))), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Before ModelCheckpoint's hook (Lightning runs the checkpoint callbacks last): the save sees it.
        if self.trainer.global_step == 6 and self.global_rank == 1:
            weight = self.l1.weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            with torch.no_grad():
                local.view(-1)[0] = math.nan  # a fault of rank 1's own copy: its neighbour's is fine

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)), 8)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    warnings.simplefilter("ignore")
    guard = GradGuard(log_every_n_steps=4, max_consecutive_skips=2,
                      rollback=Rollback(every=4, keep=2, skip_file=False))  # fmt: skip
    saving = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    accelerator, devices = "cpu", 2
    strategy: Any = "ddp"
    if mode == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif mode == "fsdp1":
        from pytorch_lightning.strategies import FSDPStrategy

        accelerator, devices = "cuda", torch.cuda.device_count()
        strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    t = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=10, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, saving], num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        t.fit(Net(mode))
    rank = t.global_rank
    gate = guard.component("checkpoints")
    result = {
        "rank": rank,
        "global_step": t.global_step,
        "events": [(e.kind, e.step, e.action) for e in guard.events],
        "quarantined": [e.extra.get("quarantined") for e in guard.events if e.kind == "rollback"],
        "why": [e.extra["why"] for e in guard.events if e.kind == "checkpoint"],
        "records": [(Path(r["path"]).name, r["step"], r["healthy"], r["quarantined"]) for r in gate.records],
    }
    (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    leave_when_written(rank, [out / f"{mode}{r}.json" for r in range(1, devices)])


if __name__ == "__main__":
    main()
