"""Where the per-timestep tracking's time goes on a logging step (plain loop, cProfile + CUDA sync count).

    PYTHONPATH=. python benchmarks/profile_timesteps.py [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import warnings

import torch
from timestep_overhead import LM  # the same 2-layer LSTM language model (this folder)
from torch import nn

from lightning_gradguard import GuardCore, NormClip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    dev = parser.parse_args().device
    torch.manual_seed(0)
    model = LM().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randint(0, 1000, (32, 64), device=dev)
    y = torch.randint(0, 1000, (32, 64), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step(guard: GuardCore | None) -> None:
        if guard is not None:
            guard.begin_step(log=True)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 1000), y.reshape(-1))
        if guard is not None:
            guard.observe_loss(loss)
        loss.backward()
        if guard is not None:
            guard.step(opt, log=True)
        opt.step()

    configs = {
        "bare": None,
        "guard, log every step, no timesteps": GuardCore(model, clip=NormClip(1.0), track_timesteps=False),
        "guard, log every step, timesteps": GuardCore(model, clip=NormClip(1.0)),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(3):
        for g in configs.values():
            step(g)
    for _ in range(15):
        for name, g in configs.items():
            sync()
            t = time.perf_counter()
            step(g)
            sync()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["bare"])
    for name, ts in times.items():
        print(f"{name:<40} {statistics.median(ts) * 1e3:7.2f} ms  {statistics.median(ts) / base:.3f}x")
    guard = configs["guard, log every step, timesteps"]
    if dev == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step(guard)
            torch.cuda.set_sync_debug_mode("default")
        print("syncs in one logging step with timesteps:", sum("synchroniz" in str(w.message) for w in caught))
        for w in caught[:6]:
            print("  ", str(w.message)[:100], w.filename.split("/")[-1], w.lineno)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        step(guard)
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
