"""What the checkpoint gate costs: its save-time check next to the save itself, and a step without a save.

Two of ``bench.py``'s models, (a) the 2-layer LSTM language model and (b) the 6-layer Transformer
encoder, each trained a few Adam steps in a plain PyTorch loop so that the optimizer state exists.
Then, interleaved ``rounds`` times (A B A B ...):

  save    ``trainer.save_checkpoint(path)`` of a Lightning Trainer that trained the model (the gate off
          there, so that the save does not hold the check), to a file on this machine's disk: what a
          ``ModelCheckpoint`` save costs
  check   ``CheckpointGate.check``: one fused max-abs norm per (device, dtype) group over the weights,
          buffers and every optimizer state tensor, the guard's vetoes, one host read

Reported: the median of each, and check / save (target: at most 2%). Then a step without a save:
``GuardCore.step`` with the gate (the default) against ``checkpoints=None``, interleaved: the gate has
no per-step hook, so the ratio is noise around 1.

    cd benchmarks && ../.venv/bin/python checkpoint_bench.py      # writes RESULTS-checkpoints.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from bench import Encoder  # model (b) (this folder)
from timestep_overhead import LM  # model (a)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import GradGuard, GuardComponent, GuardCore, NormClip
from lightning_gradguard.core.checkpoints import CheckpointGate


def _trained(build: Callable[[], nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, 1000, (32, 64)), torch.randint(0, 1000, (32, 64))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    return model, opt, x, y


class Wrapped(pl.LightningModule):
    """The bench model under a Trainer, with the Adam state of its plain loop."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.opt, self.x, self.y = model, opt, x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.x).flatten(0, 1), self.y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.opt

    def train_dataloader(self) -> Any:
        return [0, 0]


def _trainer(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, root: str) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[GradGuard(checkpoints=None)])  # fmt: skip
    trainer.fit(Wrapped(model, opt, x, y))
    return trainer


def bench_model(label: str, build: Callable[[], nn.Module], rounds: int) -> list[str]:
    model, opt, x, y = _trained(build)
    guard = GuardCore(model, clip=NormClip(1.0), track_timesteps=False)
    guard.prepare(model, [opt])
    gate = guard.component("checkpoints")
    assert isinstance(gate, CheckpointGate)
    saves, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.ckpt"
        trainer = _trainer(model, opt, x, y, tmp)
        for _ in range(rounds):
            t0 = time.perf_counter()
            trainer.save_checkpoint(path)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verdict = gate.check(0, guard.save_vetoes())
            checks.append(time.perf_counter() - t0)
            assert verdict.healthy
        size = path.stat().st_size
    save, check = statistics.median(saves), statistics.median(checks)
    # A step without a save: the guard with the gate against the guard without it, interleaved.
    guards = {"gate on": GuardCore(model, clip=NormClip(1.0), track_timesteps=False),
              "gate off": GuardCore(model, clip=NormClip(1.0), track_timesteps=False, checkpoints=None)}  # fmt: skip
    for g in guards.values():
        g.prepare(model, [opt])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    alone: dict[str, list[float]] = {name: [] for name in guards}
    for i in range(300):
        for name in sorted(guards, reverse=bool(i % 2)):  # each goes first every other round
            t0 = time.perf_counter()
            guards[name].step(opt)
            alone[name].append(time.perf_counter() - t0)
    on, off = statistics.median(alone["gate on"]), statistics.median(alone["gate off"])
    step_hooks = ("begin_step", "observe_loss", "gate", "register", "flags_reduced", "skip_event", "settle",
                  "report", "observe", "end_step")  # fmt: skip
    overridden = [h for h in step_hooks if getattr(CheckpointGate, h) is not getattr(GuardComponent, h)]
    return [
        f"### {label}",
        "",
        "| | median (ms) |",
        "|---|---|",
        f"| `trainer.save_checkpoint` ({size / 2**20:.1f} MiB) | {save * 1e3:.1f} |",
        f"| the gate's check | {check * 1e3:.2f} |",
        "",
        f"check / save: **{check / save:.2%}** (medians of {rounds} interleaved rounds).",
        "",
        f"`GuardCore.step` without a save (300 interleaved calls each, median): gate on {on * 1e3:.3f} ms, "
        f"gate off {off * 1e3:.3f} ms, ratio **{on / off:.3f}** (noise: the gate overrides "
        f"{', '.join(overridden) or 'none'} of a step's hooks).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-checkpoints.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [
        "# The checkpoint gate's cost (benchmarks/checkpoint_bench.py)",
        "",
        f"{dt.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, 2 threads, "
        f"CPU tensors, a local disk. On a GPU the check is one fused kernel per (device, dtype) group and one "
        "read of one number; the save copies every tensor to the host first.",
        "",
    ]
    lines += bench_model("(a) 2-layer LSTM LM", LM, args.rounds)
    lines += bench_model("(b) 6-layer Transformer encoder", Encoder, args.rounds)
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
