"""The exploding RNN from the demo, stabilised: no clipping vs NormClip vs AGC vs ZClip.

The configuration is the demo's ``exploding`` run (``examples/vanishing_gradients.py``): a tanh RNN
with an orthogonal recurrent init of gain 2, SGD with momentum 0.9 at lr 0.02 decayed along a cosine
over 1,000 steps, on the 50-token long-range task, with 1 training record in 1,600 corrupted by a
NaN reading. The guard runs in every configuration, so the NaN steps are skipped everywhere; what
changes is the clipper:

* ``none``     — no clipping: every exploding gradient goes straight into SGD;
* ``NormClip`` — the total norm clipped to 1 (Pascanu et al., 2013);
* ``AGC``      — unit-wise adaptive clipping (Brock et al., 2021), λ = 0.05, head excluded;
* ``ZClip``    — z-score spike clipping (Kumar et al., 2025), defaults.

It prints, per clipper, the final training loss (mean of the last 50 steps), validation accuracy,
the largest pre-clip norm, clipped and skipped steps, and writes each loss curve to TensorBoard
under ``runs/clipping/<clipper>`` (``tensorboard --logdir runs/clipping``).

    python examples/clipping_comparison.py          # about a minute on 2 CPU cores

The digits vary with the machine and the number of threads (``--threads``); ``--markdown`` prints the
table as the README's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vanishing_gradients import BATCH, CONFIGS, SequenceClassifier, accuracy, long_range_data, train_loader

from lightning_gradguard import AGC, GradGuard, GradGuardWarning, NonFiniteGradientError, NormClip, ZClip
from lightning_gradguard.clip import Clipper

CLIPPERS: dict[str, Any] = {
    "none": lambda: None,
    "NormClip": lambda: NormClip(max_norm=1.0),
    "AGC": lambda: AGC(clip_factor=0.05, exclude=["head"]),
    "ZClip": lambda: ZClip(),
}


class LossTrace(pl.Callback):
    """Keeps every training loss (the curve itself goes to TensorBoard through ``self.log``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def run(name: str, steps: int | None, logdir: Path) -> dict[str, Any]:
    clip: Clipper | None = CLIPPERS[name]()
    cfg = dict(CONFIGS["exploding"])
    corrupt = cfg.pop("corrupt_every")
    budget = cfg.pop("steps")
    steps = budget if steps is None else steps
    model = SequenceClassifier(**cfg)
    train = long_range_data(16384, seed=1, corrupt_every=corrupt, batch=BATCH)
    val = long_range_data(1024, seed=2)
    guard = GradGuard(clip=clip, log_every_n_steps=10, max_consecutive_skips=5)
    trace = LossTrace()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[guard, trace],
        logger=TensorBoardLogger(logdir, name=name, version=""),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    diverged = None
    try:
        trainer.fit(model, train_loader(train, seed=0))
    except NonFiniteGradientError:  # max_consecutive_skips: the run is not recovering
        diverged = guard.core.steps
    finite = [v for v in trace.losses[-50:] if math.isfinite(v)]
    return {
        "name": name,
        "loss": sum(finite) / len(finite) if finite else math.nan,
        "accuracy": accuracy(model, val),
        "max_norm": guard.core.max_total_norm,
        "clipped": guard.core.clipped_steps,
        "steps": guard.core.steps,
        "skipped": guard.skipped_steps,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "seconds": time.perf_counter() - start,
        "diverged": diverged,
    }


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison's table: plain text for a terminal, or Markdown (``markdown=True``, the README's table)."""
    columns = ("clipper", "final loss", "val acc", "max ‖g‖", "clipped", "skipped", "weights")
    rows = [
        [
            f"`{r['name']}`" if markdown else r["name"],
            f"{r['loss']:.4f}",
            f"{r['accuracy']:.1%}",
            f"{r['max_norm']:.3g}",
            f"{r['clipped']}/{r['steps']}",
            str(r["skipped"]),
            ("finite" if r["finite"] else "NaN")
            + (f", diverged at step {r['diverged']}" if r["diverged"] is not None else ""),
        ]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(cells[i]) for cells in [list(columns), *rows]) for i in range(len(columns))]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    header = line(columns)
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's, 1000)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 2)")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown, as in the README")
    parser.add_argument("--logdir", type=Path, default=Path("runs/clipping"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=GradGuardWarning)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    threads = args.threads or max(1, min(2, torch.get_num_threads()))
    torch.set_num_threads(threads)
    results = [run(name, args.steps, args.logdir) for name in CLIPPERS]
    cfg = CONFIGS["exploding"]
    print()
    print(
        f"Exploding tanh RNN (gain {cfg['gain']:g}, SGD lr {cfg['lr']:g} with a cosine decay), 50-token task; "
        "NaN records skipped by the guard in every run"
    )
    print(f"{threads} CPU thread{'s' if threads > 1 else ''}; digits vary by machine and threads")
    print()
    print(format_table(results, markdown=args.markdown))
    print()
    print("final loss: mean training loss over the last 50 steps (chance: ln 4 = 1.386).")
    print(f"Loss curves: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
