"""Run by tests/integrations/test_replicas.py: the replica check under HSDP, Lightning's
``ModelParallelStrategy`` on 4 CPU processes (gloo), every layer ``fully_shard``-ed over its 2-D device mesh
(replicated along ``data_parallel``, sharded along ``tensor_parallel``): ranks 0 and 2 hold one shard of
each weight, ranks 1 and 3 the other.

At the start of step 5 rank 2 flips one mantissa bit of its shard of ``l1.weight`` (a simulated silent data
corruption). The check runs on logging steps (every 4: steps 3, 7, 11). Each rank writes OUTDIR/hsdp<r>.json:
its events and the replica check's counters.

Usage: python tests/hsdp_replica_run.py OUTDIR
"""

from __future__ import annotations

import json
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

from lightning_gradguard import GradGuard, GradGuardWarning, Replicas
from tests.helpers import leave_when_written

FLIP_STEP, FLIP_RANK = 5, 2


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 1)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for unit in (self.l0, self.l1, self.l2):
            fully_shard(unit, mesh=self.device_mesh)  # a 2-D mesh: HSDP (replicate, shard)
        fully_shard(self, mesh=self.device_mesh)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x))))), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == FLIP_STEP and self.global_rank == FLIP_RANK:
            with torch.no_grad():
                words = self.l1.weight.to_local().view(-1).view(torch.int32)  # type: ignore[operator]
                words[3] = words[3] ^ (1 << 12)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)), 8)


def main() -> None:
    out = Path(sys.argv[1])
    warnings.simplefilter("ignore")
    guard = GradGuard(log_every_n_steps=4, replicas=Replicas())
    t = pl.Trainer(
        accelerator="cpu", devices=4, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard], num_sanity_val_steps=0, default_root_dir=str(out),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        t.fit(Net())
    check = guard.core.component("replicas")
    result = {
        "rank": t.global_rank,
        "mesh": t.strategy.device_mesh.mesh.tolist(),  # type: ignore[attr-defined]
        "divergences": [
            {"step": e.step, "layers": list(e.layers), **{k: e.extra.get(k) for k in ("ranks", "apart", "majority")}}
            for e in guard.events
            if e.kind == "replica_divergence"
        ],
        "checks": getattr(check, "checks", None),
    }
    (out / f"hsdp{t.global_rank}.json").write_text(json.dumps(result))
    leave_when_written(t.global_rank, [out / f"hsdp{r}.json" for r in range(1, 4)])


if __name__ == "__main__":
    main()
