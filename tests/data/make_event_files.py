"""Writes the event-file fixtures of ``tests/tensorboard/test_eventfile_compat.py``.

Run once with each version whose event files must keep reading (it was run with 0.2.0, and with the
version just before the package was split into subpackages)::

    .venv/bin/python tests/data/make_event_files.py 0.2.0       # in a checkout of 0.2.0
    .venv/bin/python tests/data/make_event_files.py pre-split   # the flat package, before issue 19

It trains a small recurrent model (embed -> LSTM -> head) under ``GradGuard`` with a clipper, a
NaN gradient injected at ``head`` on step 5, a NaN loss on step 9, and a layer whose gradient
vanishes, logging every step to TensorBoard. The event file goes to
``tests/data/events-<label>/run/``, and what ``gradguard report --json`` said of it at the time to
``tests/data/events-<label>.report.json``. The test reads both event files with today's code and
must say the same (the verdict only where the old rule was wrong, listed in the CHANGELOG).

The script is self-contained (it imports nothing from ``tests/``), so that it runs on any version.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip, __version__  # noqa: E402

STEPS = 16
NAN_GRAD_STEP = 5
NAN_LOSS_STEP = 9


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, math.nan)


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * 1e-12


class FixtureNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.rnn(_Shrink.apply(self.embed(x)))[0][:, -1])  # embed's gradient vanishes
        if self.trainer.global_step == NAN_GRAD_STEP:
            out = _Poison.apply(out)
        return out  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        return loss * math.nan if self.trainer.global_step == NAN_LOSS_STEP else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 12, 3, generator=g), torch.randn(128, 1, generator=g))
        return DataLoader(data, batch_size=8)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else __version__
    root = HERE / f"events-{label}"
    shutil.rmtree(root, ignore_errors=True)
    options: dict[str, Any] = {"vanish_patience": 2}
    if "images" in inspect.signature(GradGuard).parameters:  # newer than 0.2.0: no matplotlib needed
        options["images"] = False
    guard = GradGuard(clip=NormClip(max_norm=0.05), log_every_n_steps=1, **options)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[guard],
        logger=TensorBoardLogger(root, name="run", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer.fit(FixtureNet())
    from lightning_gradguard.health.judge import main as report_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = report_main(["report", str(root), "--json"])
    report = json.loads(out.getvalue())
    for run in report if isinstance(report, list) else [report]:
        if "run" in run:
            run["run"] = Path(run["run"]).name  # the run's folder, wherever the fixture lies
    expected = {"version": __version__, "status": status, "report": report}
    (HERE / f"events-{label}.report.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {root} and its report (exit status {status})")


if __name__ == "__main__":
    main()
