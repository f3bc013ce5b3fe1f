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
* ``exploding`` — a tanh RNN with an expanding recurrent init (orthogonal, gain 2) trained with
                  SGD (momentum 0.9, lr 0.02 decayed to 0 along a cosine over 1,000 steps): its
                  gradient grows going back in time (about 1.2x per step, 10^4 across the sequence
                  at init) and its norm reaches 10^3; ``NormClip`` rescales it to 1 (Pascanu et al.,
                  2013), and it learns. 1 training record in 1,600 is corrupted (a NaN reading):
                  the guard skips those steps instead of letting NaN into the weights.
                  ``examples/clipping_comparison.py`` runs it without clipping (it stays at chance)
                  and with the other clippers.

The table shows, per run, validation accuracy, the per-timestep gradient summaries at the first
logging step (first/last ratio, decay per step back in time, horizon) and the first/last ratio at
the last one, the largest gradient norm before clipping, how many steps were clipped and skipped,
and whether the weights stayed finite.

``rnn`` and ``lstm`` use the same data, optimizer (Adam, lr 1e-3) and step budget (500 steps of 64
sequences). Given thousands of steps, Adam's per-parameter rescaling sometimes rescues a vanilla RNN
on this task; the point is the gap the per-timestep profile explains, not an impossibility. The
``exploding`` run gets 1,000 steps: clipped SGD often crosses plateaus (50%, 75%) before it learns
the task, and the decaying learning rate lets it settle.

The digits depend on the machine and on the number of threads (float sums in another order); the
conclusions above do not, and ``tests/test_demo.py`` checks them (several seeds, 1 and 2 threads
were checked when the configuration was chosen). ``--seed`` changes the initialisation and the
batch order, ``--threads`` the number of CPU threads, ``--markdown`` prints the table as the
README's.

Run ``make demo`` (or ``python examples/vanishing_gradients.py``); it takes about 20 seconds on two
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
    """A recurrent classifier reading the whole sequence and answering at the end.

    ``cosine``: the learning rate decays from ``lr`` to 0 along a cosine over the trainer's ``max_steps``.
    """

    def __init__(
        self,
        cell: str = "rnn",
        gain: float | None = None,
        lr: float = 1e-3,
        seed: int = 0,
        optim: str = "adam",
        cosine: bool = False,
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
        self.cosine = cosine

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer: torch.optim.Optimizer
        if self.optim == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.cosine:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# Each run's model arguments, its step budget and (``corrupt_every``) its NaN records. The ``exploding``
# configuration was chosen so that its conclusion holds with margin: over 20 seeds with 1 thread and
# 6 seeds with 2, it learned the task (>= 99.9%) every time; without clipping it stayed at chance (5
# seeds), and with a constant learning rate it stalled at chance once in 5 seeds.
CONFIGS: dict[str, dict[str, Any]] = {
    "rnn": {"cell": "rnn", "steps": 500},
    "lstm": {"cell": "lstm", "steps": 500},
    "exploding": {
        "cell": "rnn", "gain": 2.0, "lr": 0.02, "optim": "sgd", "cosine": True, "steps": 1000, "corrupt_every": 25,
    },
}  # fmt: skip
BATCH = 64


class FirstProfile(pl.Callback):
    """Keeps the per-timestep summaries of the first logging step: the gradient flow at the start."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.summary: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.summary:
            self.summary = dict(self.guard.core.timestep_summaries.get("rnn", {}))


class PoisonedBatches(pl.Callback):
    """Counts the training batches holding a non-finite reading: what the guard must skip, seen from the data."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.count += int(not bool(torch.isfinite(batch[0]).all()))


def train_loader(data: TensorDataset, seed: int) -> DataLoader[tuple[Tensor, ...]]:
    """The training batches, shuffled in an order that ``seed`` fixes."""
    return DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def run(name: str, logdir: Path, steps: int | None = None, seed: int = 0, n_train: int = 16384) -> dict[str, Any]:
    """Trains one configuration of ``CONFIGS`` under the guard and returns what the table shows.

    Args:
        name: a key of ``CONFIGS``.
        logdir: the TensorBoard logs go to ``logdir/name``.
        steps: optimizer steps; None: the configuration's own budget.
        seed: the model's initialisation and the order of the batches (the data themselves are fixed).
        n_train: training sequences.
    """
    cfg = dict(CONFIGS[name])
    corrupt = cfg.pop("corrupt_every", 0)
    budget = cfg.pop("steps")
    steps = budget if steps is None else steps
    model = SequenceClassifier(**cfg, seed=seed)
    train = long_range_data(n_train, seed=1, corrupt_every=corrupt, batch=BATCH)
    val = long_range_data(1024, seed=2)
    guard = GradGuard(clip=NormClip(max_norm=1.0), log_every_n_steps=10, max_consecutive_skips=5)
    first = FirstProfile(guard)
    poisoned = PoisonedBatches()
    logger = TensorBoardLogger(logdir, name=name, version="")
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[guard, first, poisoned],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader(train, seed))
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
        "poisoned": poisoned.count,
        "nonfinite_events": len(norms),
        "origins": dict(guard.core.origins),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "seconds": seconds,
        "logdir": logger.log_dir,
    }


COLUMNS = ("model", "val acc", "first/last", "decay/step", "horizon", "f/l at end", "max ‖g‖", "clipped", "skipped",
           "weights", "time")  # fmt: skip


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    """The demo's table: plain text for a terminal, or Markdown (``markdown=True``, the README's table)."""
    rows = [
        [
            f"`{r['name']}`" if markdown else r["name"],
            f"{r['accuracy']:.1%}",
            f"{r['ratio0']:.2e}",
            f"{r['decay']:.3f}",
            f"{r['horizon']:.0f}",
            f"{r['ratio']:.2e}",
            f"{r['max_norm']:.3g}",
            f"{r['clipped']}/{r['steps']}",
            str(r["skipped"]),
            "finite" if r["finite"] else "NaN",
            f"{r['seconds']:.0f}s",
        ]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(cells[i]) for cells in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    header = line(COLUMNS)
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 500, exploding 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the models' initialisation and the batch order")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 2)")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown, as in the README")
    parser.add_argument("--logdir", type=Path, default=Path("runs/vanishing_gradients"))
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=GradGuardWarning)  # the table below says it all
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    threads = args.threads or max(1, min(2, torch.get_num_threads()))
    torch.set_num_threads(threads)

    results = [run(name, args.logdir, steps=args.steps, seed=args.seed) for name in args.only]

    print()
    print("GradGuard demo — long-range dependency, 50 tokens, label = first token (chance: 25%)")
    print(f"seed {args.seed}, {threads} CPU thread{'s' if threads > 1 else ''}; digits vary by machine and threads")
    print()
    print(format_table(results, markdown=args.markdown))
    print()
    for r in results:
        if r["skipped"] or r["poisoned"]:
            origins = ", ".join(f"{k} x{v}" for k, v in r["origins"].items())
            kept = "stayed finite" if r["finite"] else "did NOT stay finite"
            print(
                f"{r['name']}: {r['poisoned']} batches held a NaN record; the guard skipped {r['skipped']} steps "
                f"(origins: {origins}); weights {kept}."
            )
    print("Gradient flow at the first logging step (step 10), before any learning:")
    print("  first/last: ‖∂L/∂x_0‖ / ‖∂L/∂x_49‖; decay/step: the factor by which the gradient changes per")
    print("  step back in time (< 1 vanishes, > 1 explodes); horizon: steps back from the end where it stays")
    print("  above 1% of its peak (the model's effective memory). f/l at end: first/last at the last log.")
    print()
    print(f"TensorBoard logs: {args.logdir.resolve()}")
    print(f"  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
