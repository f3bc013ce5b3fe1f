"""Overhead of the guard and of per-timestep tracking, measured side by side in one process.

Model: 2-layer LSTM language model (vocab 1000, embedding 128, hidden 256, sequence 64, batch 32),
plain PyTorch loop, CPU. Configurations run interleaved (A B C A B C ...) after a warm-up; the
median step time of each is reported as a ratio to the bare loop.

    python benchmarks/timestep_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from lightning_gradguard import GuardCore, NormClip


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        self.rnn = nn.LSTM(128, 256, num_layers=2, batch_first=True)
        self.out = nn.Linear(256, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(x))[0])


def main(rounds: int = 15, steps: int = 4) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randint(0, 1000, (32, 64))
    y = torch.randint(0, 1000, (32, 64))
    configs = {
        "bare + clip_grad_norm_": None,
        "guard NormClip, log every 50": GuardCore(model, clip=NormClip(1.0), track_timesteps=False),
        "guard, per-layer every step": GuardCore(
            model, clip=NormClip(1.0), log_every_n_steps=1, track_timesteps=False
        ),
        "guard, per-layer + timesteps every step": GuardCore(model, clip=NormClip(1.0), log_every_n_steps=1),
    }
    for core in configs.values():
        if core is not None:
            core.unwatch()
    times: dict[str, list[float]] = {k: [] for k in configs}

    def one(core: GuardCore | None) -> None:
        if core is not None:
            core.begin_step()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if core is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            core.step(opt)
        opt.step()

    for r in range(rounds + 2):
        for name, core in configs.items():
            if core is not None:
                core.watch(model)
            start = time.perf_counter()
            for _ in range(steps):
                one(core)
            if r >= 2:
                times[name].append((time.perf_counter() - start) / steps)
            if core is not None:
                core.unwatch()
    base = statistics.median(times["bare + clip_grad_norm_"])
    print(f"{'configuration':<42} {'median ratio':>12} {'min':>6} {'max':>6}")
    for name, ts in times.items():
        ratios = [t / base for t in ts]
        print(f"{name:<42} {statistics.median(ts) / base:>12.3f} {min(ratios):>6.3f} {max(ratios):>6.3f}")
    print(f"baseline median step: {base * 1e3:.1f} ms (torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
