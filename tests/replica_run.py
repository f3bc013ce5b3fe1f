"""Run by tests/integrations/test_replicas.py: the replica check under Lightning's DDP on 3 CPU processes
(gloo), one fit per mode in the same launch.

Usage: python tests/replica_run.py OUTDIR MODE [MODE ...]
MODE: ``off`` (no check), ``warn``, ``repair``, ``stop``, ``rollback``. At the start of step 5 rank 1
flips one mantissa bit of one element of ``l1.weight`` and of its Adam ``exp_avg`` (an XOR through an
int32 view: a simulated silent data corruption). The check runs on logging steps (every 4: steps 3, 7,
11, ...). Each rank writes OUTDIR/<mode><r>.json: its events, the step it stopped at, and the checksum
of its final weights (bit-exact: equal on every rank when the replicas agree).
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
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, Replicas, Rollback
from lightning_gradguard.core.replicas import checksum
from tests.helpers import leave_when_written

FLIP_STEP = 5


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x))))), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == FLIP_STEP and self.global_rank == 1:
            with torch.no_grad():
                words = self.l1.weight.data.view(-1).view(torch.int32)
                words[3] = words[3] ^ (1 << 12)  # one mantissa bit of one element
                # and one of its Adam moment: a repair that left the optimizer state apart would see the
                # weights drift apart again at the next update
                moment = self.trainer.optimizers[0].state[self.l1.weight]["exp_avg"].view(-1).view(torch.int32)
                moment[3] = moment[3] ^ (1 << 12)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(512, 6, generator=g), torch.randn(512, 1, generator=g)), 8)


class ReduceSizes(pl.Callback):
    """How many values each step's collective sums (the strategy's reduce, wrapped at fit start)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy, reduce = trainer.strategy, trainer.strategy.reduce

        def counted(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(tensor, Tensor):
                self.sizes[trainer.global_step] = self.sizes.get(trainer.global_step, 0) + tensor.numel()
            return reduce(tensor, *args, **kwargs)

        strategy.reduce = counted  # type: ignore[method-assign]


def fit(mode: str, out: Path) -> int:
    options: dict[str, Any] = {}
    if mode != "off":
        options["replicas"] = Replicas(action=mode)  # type: ignore[arg-type]
    if mode == "rollback":
        options["rollback"] = Rollback(every=4, keep=2, skip_file=False)
    guard = GradGuard(log_every_n_steps=4, **options)
    sizes = ReduceSizes()
    t = pl.Trainer(
        accelerator="cpu", devices=3, strategy="ddp", max_steps=16, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[sizes, guard], num_sanity_val_steps=0,
        default_root_dir=str(out),
    )  # fmt: skip
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        t.fit(model)
    rank = t.global_rank
    with torch.no_grad():
        final = [int(checksum(p.detach())) for p in model.parameters()]
    result = {
        "rank": rank,
        "global_step": t.global_step,
        "events": [(e.kind, e.step, e.action) for e in guard.events],
        "divergences": [
            {k: e.extra.get(k) for k in ("ranks", "apart", "majority", "layers", "repaired", "source", "devices")}
            for e in guard.events
            if e.kind == "replica_divergence"
        ],
        "messages": [e.message for e in guard.events if e.kind == "replica_divergence"],
        "final": final,
        "reduce_sizes": {str(k): v for k, v in sizes.sizes.items()},
    }
    (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    return rank


def main() -> None:
    out, modes = Path(sys.argv[1]), sys.argv[2:]
    warnings.simplefilter("ignore")
    rank = 0
    for mode in modes:
        rank = fit(mode, out)
    leave_when_written(rank, [out / f"{modes[-1]}{r}.json" for r in range(1, 3)])


if __name__ == "__main__":
    main()
