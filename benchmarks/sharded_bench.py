"""The guard under FSDP2 (Lightning's ModelParallelStrategy), 2 processes, against clip_grad_norm_.

Configurations, run interleaved in the same two processes (one short fit each per round):

* ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)`` in
  ``configure_gradient_clipping`` (it handles DTensor parameters: its total norm is a DTensor
  reduced across the shards);
* ``GradGuard``: ``GradGuard(clip=NormClip(1.0))``, logging every 50 steps.

Each round's median step time of the guard is divided by clip_grad_norm_'s in the same round; the
median, min and max over rounds are written as JSON. Run by ``benchmarks/bench.py`` (Lightning
re-executes this script once per rank, so it cannot run inside bench.py's own process).

    python benchmarks/sharded_bench.py OUT.json [--rounds 5] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from bench import StepTimer  # the same timer as make bench (this folder)
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, NormClip


class Net(pl.LightningModule):
    def __init__(self, clip_in_module: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.clip_in_module = clip_in_module
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(8)])
        self.head = nn.Linear(256, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x))  # type: ignore[no-any-return]

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in self.layers:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if self.clip_in_module:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(4096, 256, generator=g), torch.randn(4096, 1, generator=g)), 64)


def fit(guarded: bool, steps: int) -> float:
    timer = StepTimer(lambda: None)
    callbacks: list[pl.Callback] = [GradGuard(clip=NormClip(1.0), track_timesteps=False), timer] if guarded else [timer]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Net(clip_in_module=not guarded))
    return statistics.median(timer.times[3:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    ratios, ms = [], {"clip_grad_norm_": [], "GradGuard": []}  # type: ignore[var-annotated]
    for _ in range(args.rounds):
        base = fit(False, args.steps)
        guard = fit(True, args.steps)
        ratios.append(guard / base)
        ms["clip_grad_norm_"].append(base * 1e3)
        ms["GradGuard"].append(guard * 1e3)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        result = {
            "ratio": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "ms": {k: statistics.median(v) for k, v in ms.items()},
            "rounds": args.rounds,
            "steps": args.steps,
        }
        args.out.write_text(json.dumps(result))
        print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
