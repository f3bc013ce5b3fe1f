"""The seed's story, run for real: vanishing and exploding gradients through time.

Task: "I grew up in France ... I speak French". Each sequence is 50 one-hot tokens; the label is the
first token (one of 4 "countries"), followed by 49 distractor tokens. To answer, the model must
carry the first token across 49 steps, and its gradient must flow back across them.

Three runs, each with ``GradGuard(clip=NormClip(max_norm=1.0))`` watching every optimizer step
and per-timestep tracking of the recurrent layer:

* ``rnn``       — a vanilla tanh RNN with PyTorch's default init: the gradient reaching the first
                  token vanishes (first/last ratio far below 1e-4), and within the step budget it
                  does not learn the dependency: its accuracy stays at chance;
* ``lstm``      — an LSTM whose forget gates start open (bias 3): the cell state carries the
                  gradient back across all 50 steps, and it learns the task in a few hundred steps;
* ``exploding`` — a tanh RNN with an expanding recurrent init (orthogonal, gain 1.5) trained with
                  SGD (momentum 0.9, lr 0.1): its gradient grows going back in time and its norm
                  spikes by orders of magnitude; ``NormClip`` rescales it to 1 (Pascanu et al.,
                  2013), and it learns. 1 training record in 1,600 is corrupted (a NaN reading):
                  the guard skips those steps instead of letting NaN into the weights.
                  ``examples/clipping_comparison.py`` runs it without clipping and with the other
                  clippers.

The table shows, per run, validation accuracy, the per-timestep gradient summaries at the last
logging step (first/last ratio, decay per step back in time, horizon), the largest gradient norm
before clipping, how many steps were clipped and skipped, and whether the weights stayed finite.

``rnn`` and ``lstm`` use the same data, optimizer (Adam, lr 1e-3) and step budget (500 steps of 64
sequences). Given
thousands of steps, Adam's per-parameter rescaling sometimes rescues a vanilla RNN on this task; the
point is the gap the per-timestep profile explains, not an impossibility.

Run ``make demo`` (or ``python examples/vanishing_gradients.py``); it takes about 10 seconds on two
CPU cores and writes TensorBoard logs under ``runs/``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip

SEQ_LEN = 50
COUNTRIES = 4
VOCAB = 8
HIDDEN = 64


def long_range_data(n: int, seed: int, corrupt_every: int = 0, batch: int = 64) -> TensorDataset:
    """Sequences whose label is their first token; 1 record in ``corrupt_every * batch`` holds a NaN."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, COUNTRIES, (n,), generator=g)
    tokens = torch.randint(COUNTRIES, VOCAB, (n, SEQ_LEN), generator=g)
    tokens[:, 0] = first
    x = nn.functional.one_hot(tokens, VOCAB).float()
    if corrupt_every:
        for start in range(batch * (corrupt_every - 1), n, batch * corrupt_every):
            x[start, SEQ_LEN // 2, 0] = math.nan  # one corrupted reading in one record
    return TensorDataset(x, first)


class SequenceClassifier(pl.LightningModule):
    """A recurrent classifier reading the whole sequence and answering at the end."""

    def __init__(
        self, cell: str = "rnn", gain: float | None = None, lr: float = 1e-3, seed: int = 0, optim: str = "adam"
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(VOCAB, HIDDEN, batch_first=True)
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    # Forget gates start open (Gers et al. 2000; Jozefowicz et al. 2015 use 1; a long
                    # memory wants more): sigmoid(3) = 0.95 keeps 0.95**50 = 8% of the cell state.
                    nn.init.constant_(p[HIDDEN : 2 * HIDDEN], 3.0)
        else:
            nonlinearity = "relu" if cell == "relu" else "tanh"
            self.rnn = nn.RNN(VOCAB, HIDDEN, batch_first=True, nonlinearity=nonlinearity)
        if gain is not None:
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)
        self.head = nn.Linear(HIDDEN, COUNTRIES)
        self.lr = lr
        self.optim = optim

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optim == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


CONFIGS: dict[str, dict[str, Any]] = {
    "rnn": {"cell": "rnn"},
    "lstm": {"cell": "lstm"},
    "exploding": {"cell": "rnn", "gain": 1.5, "lr": 0.1, "optim": "sgd", "corrupt_every": 25},
}


class FirstProfile(pl.Callback):
    """Keeps the per-timestep summaries of the first logging step: the gradient flow at the start."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.summary: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.summary:
            self.summary = dict(self.guard.core.timestep_summaries.get("rnn", {}))


def run(name: str, steps: int, logdir: Path, n_train: int = 16384) -> dict[str, Any]:
    cfg = dict(CONFIGS[name])
    corrupt = cfg.pop("corrupt_every", 0)
    model = SequenceClassifier(**cfg)
    train = long_range_data(n_train, seed=1, corrupt_every=corrupt)
    val = long_range_data(1024, seed=2)
    guard = GradGuard(clip=NormClip(max_norm=1.0), log_every_n_steps=10, max_consecutive_skips=5)
    first = FirstProfile(guard)
    logger = TensorBoardLogger(logdir, name=name, version="")
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[guard, first],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seconds = time.perf_counter() - start
    summary = guard.core.timestep_summaries.get("rnn", {})
    norms = [e.value for e in guard.events if e.kind == "nonfinite"]
    return {
        "name": name,
        "accuracy": accuracy(model, val),
        "ratio0": first.summary.get("first_last_ratio", math.nan),
        "ratio": summary.get("first_last_ratio", math.nan),
        "decay": first.summary.get("decay_per_step", math.nan),
        "horizon": first.summary.get("horizon", math.nan),
        "max_norm": guard.core.max_total_norm,
        "clipped": guard.core.clipped_steps,
        "steps": guard.core.steps,
        "skipped": guard.skipped_steps,
        "nonfinite_events": len(norms),
        "origins": dict(guard.core.origins),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "seconds": seconds,
        "logdir": logger.log_dir,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    parser.add_argument("--logdir", type=Path, default=Path("runs/vanishing_gradients"))
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=GradGuardWarning)  # the table below says it all
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    results = [run(name, args.steps, args.logdir) for name in args.only]

    print()
    print("GradGuard demo — long-range dependency, 50 tokens, label = first token (chance: 25%)")
    print()
    header = f"{'model':<10} {'val acc':>8} {'first/last':>11} {'decay/step':>11} {'horizon':>8} {'f/l at end':>11} "
    header += f"{'max ‖g‖':>10} {'clipped':>8} {'skipped':>8} {'weights':>8} {'time':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['name']:<10} {r['accuracy']:>8.1%} {r['ratio0']:>11.2e} {r['decay']:>11.3f} {r['horizon']:>8.0f} "
            f"{r['ratio']:>11.2e} "
            f"{r['max_norm']:>10.3g} {r['clipped']:>4}/{r['steps']:<3} {r['skipped']:>8} "
            f"{'finite' if r['finite'] else 'NaN':>8} {r['seconds']:>5.0f}s"
        )
    print()
    for r in results:
        if r["skipped"]:
            origins = ", ".join(f"{k} x{v}" for k, v in r["origins"].items())
            print(f"{r['name']}: {r['skipped']} poisoned steps skipped (origins: {origins}); weights stayed finite.")
    print("Gradient flow at the first logging step (step 10), before any learning:")
    print("  first/last: ‖∂L/∂x_0‖ / ‖∂L/∂x_49‖; decay/step: the factor by which the gradient changes per")
    print("  step back in time (< 1 vanishes, > 1 explodes); horizon: steps back from the end where it stays")
    print("  above 1% of its peak (the model's effective memory). f/l at end: first/last at the last log.")
    print()
    print(f"TensorBoard logs: {args.logdir.resolve()}")
    print(f"  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
