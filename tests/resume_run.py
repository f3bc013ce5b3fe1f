"""Run by tests/integrations/test_rollback.py: a rollback, a SIGKILL, and runs resumed from checkpoints.

Usage: python tests/resume_run.py OUTDIR first | OUTDIR resume CKPT NAME
``first``: batches 12 and 13 hold NaN (max_consecutive_skips=2: a rollback at step 13 to the snapshot
of step 10), checkpoints every 5 steps, and at step 18 the process kills itself with SIGKILL.
``resume``: the same run resumed from CKPT to step 25; writes OUTDIR/NAME.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, Rollback

NAN_BATCHES = (12, 13)


class Resumable(DataLoader[tuple[Tensor, ...]]):
    """A loader that resumes mid-epoch at the batch after the checkpoint's (Lightning saves and loads its
    ``state_dict``): the run resumed from a checkpoint sees the same batches at the same positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken, self.start = 0, 0

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= start:
                self.taken = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["taken"]


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.append((self.trainer.global_step, batch_idx, round(float(y[0, 0]), 4)))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(40 * 8, 4, generator=g), torch.randn(40 * 8, 1, generator=g)
        for b in NAN_BATCHES:
            x[b * 8 : (b + 1) * 8] = float("nan")
        return Resumable(TensorDataset(x, y), batch_size=8)


class Kill(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 18:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    warnings.simplefilter("ignore")
    out, mode = Path(sys.argv[1]), sys.argv[2]
    guard = GradGuard(log_every_n_steps=5, max_consecutive_skips=2, rollback=Rollback(every=5, keep=2))
    callbacks: list[pl.Callback] = [guard]
    if mode == "first":
        callbacks += [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=5, save_top_k=-1), Kill()]
    t = pl.Trainer(
        max_steps=25, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=str(out), enable_checkpointing=mode == "first",
    )  # fmt: skip
    model = Net()
    t.fit(model, ckpt_path=sys.argv[3] if mode == "resume" else None)
    result = {
        "rollbacks": guard.rollbacks,
        "skip_list": guard.skip_list,
        "events": [(e.kind, e.step) for e in guard.events],
        "seen": model.seen,
        "global_step": t.global_step,
    }
    (out / f"{sys.argv[4]}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
