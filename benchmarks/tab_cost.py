"""What the GradGuard tab's data costs a logging step, measured side by side in one process.

Model: an LSTM classifier (embedding 32, LSTM 64, sequence 50, batch 32), Lightning Trainer with a
real TensorBoardLogger, GradGuard(NormClip) logging every step (the worst case). Configurations
run interleaved (one short fit each per round); each round's median step time is divided by the
first configuration's in the same round, and the median over rounds is reported.

1. ``0.2.0 data``: what a logging step wrote before the tab: the per-timestep profile as JSON text,
   no events or config summaries (the tab's writers patched to do exactly that).
2. ``tab data``: the profile as a tensor summary, and the events (this version).
3. ``tab data + images``: as 2, with the matplotlib images drawn in the background (the default).

    python benchmarks/tab_cost.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from bench import StepTimer  # the same timer as make bench (this folder)
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip
from lightning_gradguard.tensorboard import format as tbformat


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 32)
        self.rnn = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 4)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.rnn(self.embed(x))[0][:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 100, (32 * 40, 50), generator=g)
        data = TensorDataset(x, torch.randint(0, 4, (32 * 40,), generator=g))
        return DataLoader(data, batch_size=32)


_WRITERS = ("write_profile", "write_config", "write_events", "write_layer_order")


@contextmanager
def as_in_0_2_0() -> Iterator[None]:
    """The tab's writers replaced by what 0.2.0 wrote: the profile as JSON text, nothing else."""
    saved = {name: getattr(tbformat, name) for name in _WRITERS}

    def text_profile(writer: Any, name: str, values: Any, step: int) -> bool:
        writer.add_text(f"gradguard/timestep_profile/{name}", json.dumps([float(v) for v in values]), step)
        return True

    tbformat.write_profile = text_profile  # type: ignore[assignment]
    for name in _WRITERS[1:]:
        setattr(tbformat, name, lambda *a, **k: True)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tbformat, name, fn)


def fit(steps: int, images: bool, patch: Callable[[], Any] | None) -> list[float]:
    timer = StepTimer(lambda: None)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = TensorBoardLogger(tmp, name="run", version="")
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[GradGuard(clip=NormClip(1.0), log_every_n_steps=1, images=images), timer],
        )  # fmt: skip
        if patch is None:
            trainer.fit(Classifier())
        else:
            with patch():
                trainer.fit(Classifier())
    return timer.times[5:]  # warm-up steps dropped


def main(rounds: int = 15, steps: int = 40) -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", GradGuardWarning)
    configs: dict[str, tuple[bool, Callable[[], Any] | None]] = {
        "0.2.0 data (text profile)": (False, as_in_0_2_0),
        "tab data (tensor profile + events)": (False, None),
        "tab data + images (background)": (True, None),
    }
    medians: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (images, patch) in configs.items():
            medians[name].append(statistics.median(fit(steps, images, patch)))
    base = medians[next(iter(configs))]
    print(f"{rounds} interleaved rounds x {steps} steps, logging every step, 2 CPU threads")
    print(f"{'configuration':40s} {'ratio':>7s} {'[min, max]':>16s} {'median step':>12s}")
    for name, values in medians.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        print(
            f"{name:40s} {statistics.median(ratios):7.3f} [{min(ratios):.3f}, {max(ratios):.3f}] "
            f"{statistics.median(values) * 1e3:9.2f} ms"
        )


if __name__ == "__main__":
    main()
