"""Run by tests/integrations/test_cross_rank_replay.py: a cross-rank replay under Lightning's DDP strategy on
2 CPU processes (gloo), one fit per scenario, in one launch.

Usage: python tests/cross_replay_run.py OUTDIR SCENARIO...
SCENARIO, each a fault on rank 1 only at step 3 (the first non-finite step of its fit):

* ``device``: a forward hook makes ``l1``'s output NaN on every forward pass on rank 1 at step 3,
  whatever the batch (replays included): a faulty device;
* ``data``: rank 1's batch holds a NaN: a data fault;
* ``transient``: a NaN gradient on rank 1's first backward only (``tests.helpers.once``);
* ``raises``: rank 1's batch holds a NaN, and rank 0's ``training_step`` raises on a non-finite batch
  (it only ever sees one when it replays rank 1's);
* ``spike``: rank 1's targets at step 7 are 1000 times larger (a finite spike, skipped: ``skip_spikes``);
  a callback listed before the guard records, as references, rank 1's own gradient norm at that step
  (``torch.autograd.grad`` on its batch) and the step's total norm (of the averaged gradients);
* ``plain``: rank 1's batch holds a NaN, and the adapter's replay closure is a plain callable (as a
  ``GuardCore`` user's may be): no cross-rank replay;
* ``slow``: rank 1's batch holds a NaN, the exchange's timeout is 3 s, and rank 0's replay of it takes
  6 s: rank 1 stops waiting, and the run completes.

Each rank writes OUTDIR/<scenario><rank>.json: the run's end, its events and their replays.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning
from lightning_gradguard.core import cross_replay
from lightning_gradguard.integrations.lightning import replay
from tests.helpers import Once, leave_when_written, once

STEP = 3  # the faulty step (a spike: SPIKE_STEP, after the spike statistic's warm-up)
SPIKE_STEP = 7


class Net(pl.LightningModule):
    def __init__(self, scenario: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scenario = scenario
        self.l0, self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 1)
        self.l1.register_forward_hook(self.faulty_device)

    def faulty(self, rank: int, step: int = STEP) -> bool:
        return self.global_rank == rank and self.trainer.global_step == step

    def faulty_device(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        return output * math.nan if self.scenario == "device" and self.faulty(1) else None

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch  # in place: the batch the step (and the guard's replay) runs on
        if self.scenario in ("data", "raises", "plain", "slow") and self.faulty(1):
            x[0, 0] = math.nan
        if self.scenario == "spike" and self.faulty(1, SPIKE_STEP):
            y.mul_(1e3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l0(x))
        if self.scenario == "transient" and self.faulty(1):
            h = once(h)
        return self.l2(torch.tanh(self.l1(h)))  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.global_rank == 0 and not bool(torch.isfinite(x).all()):  # rank 1's batch, replayed here
            if self.scenario == "raises":
                raise RuntimeError("rank 0 cannot run on a non-finite batch")
            if self.scenario == "slow":
                time.sleep(6.0)  # twice the timeout: a margin that a loaded machine cannot eat
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)), 8)


class Reference(pl.Callback):
    """Listed before the guard: at the spike's step, this rank's own gradient norm (an independent
    ``torch.autograd.grad`` on its batch, from the same weights) and the averaged gradients' total norm."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.norms: dict[str, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != SPIKE_STEP:
            return
        x, y = self.batch
        params = list(pl_module.parameters())
        with torch.enable_grad():
            own = torch.autograd.grad(nn.functional.mse_loss(pl_module(x), y), params)
        self.norms["own"] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in own])))
        self.norms["step"] = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))


def plain_closure(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    closure = PLAIN(pl_module, batch, batch_idx)
    return lambda: closure()  # a plain callable: it cannot take another batch


PLAIN = replay.replay_closure


def fit(scenario: str) -> dict[str, Any]:
    Once.reset()
    options: dict[str, Any] = {"skip_spikes": 6.0, "spike_warmup": 5} if scenario == "spike" else {}
    guard, reference = GradGuard(log_every_n_steps=4, **options), Reference()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=10 if scenario == "spike" else 6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[reference, guard],
    )  # fmt: skip
    replay.replay_closure = plain_closure if scenario == "plain" else PLAIN  # type: ignore[assignment]
    cross_replay.EXCHANGE_TIMEOUT_S = 3.0 if scenario == "slow" else 300.0  # read when the group is made
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer.fit(Net(scenario))
    replayed = [e for e in guard.events if "replay" in e.extra]
    return {
        "reference": reference.norms,
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "events": [(e.kind, e.step, e.value) for e in guard.events],
        "replays": [e.extra["replay"] for e in replayed],
        "messages": [e.message for e in replayed],
    }


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    warnings.simplefilter("ignore")
    rank = 0
    for scenario in scenarios:  # one fit each, in this process group (Lightning launches the ranks once)
        result = fit(scenario)
        rank = result["rank"]
        (out / f"{scenario}{rank}.json").write_text(json.dumps(result))
    leave_when_written(rank, [out / f"{s}1.json" for s in scenarios])


if __name__ == "__main__":
    main()
