"""Run by tests/integrations/test_soak.py: a small RNN with every GradGuard feature on and seeded random faults.

Usage: python tests/soak_run.py OUTDIR STEPS [--resume CKPT] [--every-epoch-ckpt]
Writes OUTDIR/result.json with the guard's counters, the injected faults, clipper state and RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, ZClip
from tests.helpers import poison

FAULT_RATE = 0.02


def fault_plan(steps: int, seed: int = 1234) -> dict[int, str]:
    rng = random.Random(seed)
    kinds = ["grad_rnn", "grad_head", "loss_inf", "input_nan"]
    return {s: rng.choice(kinds) for s in range(steps) if rng.random() < FAULT_RATE}


class SoakRNN(pl.LightningModule):
    def __init__(self, faults: dict[int, str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 1)
        self.faults = faults

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        fault = self.faults.get(self.trainer.global_step)
        if fault == "input_nan":
            x = x.clone()
            x[0, 3, 1] = math.nan
        h, _ = self.rnn(self.embed(x))
        if fault == "grad_rnn":
            h = poison(h, math.nan)
        out = self.head(h[:, -1])
        if fault == "grad_head":
            out = poison(out, math.inf)
        loss = nn.functional.mse_loss(out, y)
        return loss * math.inf if fault == "loss_inf" else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        # one batch per epoch: every epoch-end checkpoint is a clean place to resume
        return DataLoader(TensorDataset(torch.randn(16, 20, 4, generator=g), torch.randn(16, 1, generator=g)), 16)


class Rss(pl.Callback):
    def __init__(self, warm: int) -> None:
        self.warm = warm
        self.at_warm = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warm:
            self.at_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--ckpt-dir", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    faults = fault_plan(args.steps)
    guard = GradGuard(
        clip=ZClip(),
        log_every_n_steps=50,
        dump_dir=str(args.out / "dumps"),
        max_dumps=5,
        alert_handlers=[lambda e: None],
        max_consecutive_skips=25,
    )
    rss = Rss(warm=min(500, args.steps // 2))
    callbacks: list[pl.Callback] = [guard, rss]
    if args.ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=50, save_last=True))
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.out, name="tb", version=""),
        log_every_n_steps=50,
        callbacks=callbacks,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = SoakRNN(faults)
    trainer.fit(model, ckpt_path=args.resume)
    end_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clip_state = guard.core.clip.state_dict() if guard.core.clip is not None else {}
    result = {
        "steps": guard.core.steps,
        "global_step": trainer.global_step,
        "faults": len(faults),
        "skipped": guard.skipped_steps,
        "nonfinite": guard.nonfinite_steps,
        "clipped": guard.core.clipped_steps,
        "events": len(guard.events),
        "max_events": guard.core.max_events,
        "dumps": sorted(p.name for p in (args.out / "dumps").glob("*.pt")) if (args.out / "dumps").exists() else [],
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "rss_growth_mb": (end_rss - rss.at_warm) / 1024 if rss.at_warm else None,
        "clip_state": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in clip_state.items()},
        "origins": guard.core.origins,
        "summary": guard.summary(),
    }
    (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
