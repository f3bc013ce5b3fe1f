"""GradGuard's core in a plain PyTorch loop, with fp16 AMP when a GPU is present.

The documented order under a GradScaler: ``scaler.scale(loss).backward()``, then
``scaler.unscale_(optimizer)``, then ``guard.step(optimizer, scaler=scaler)``, then
``scaler.step(optimizer)`` and ``scaler.update()``. The guard measures the unscaled gradients, clips
them, and skips a poisoned step itself (the scaler skips fp16 overflows on its own).

    python examples/plain_pytorch.py [--steps 200]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from lightning_gradguard import GuardCore, NormClip


def main(steps: int = 200, nan_at: int = 50) -> GuardCore:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
    guard = GuardCore(model, clip=NormClip(max_norm=1.0), log_every_n_steps=50)
    x, y = torch.randn(512, 16, device=device), torch.randn(512, 1, device=device)
    for step in range(steps):
        i = torch.randint(0, 512, (32,), device=device)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
            loss = nn.functional.mse_loss(model(x[i]), y[i])
        if step == nan_at:
            loss = loss * math.nan  # a poisoned step, to show the guard skipping it
        guard.observe_loss(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        report = guard.step(optimizer, scaler=scaler)
        scaler.step(optimizer)  # a skipped step has no gradients left: the optimizer leaves it alone
        scaler.update()
        if report.metrics:
            print(f"step {step}: total norm {report.metrics['gradguard/total_norm']:.3f}, loss {loss.item():.4f}")
    print(guard.summary())
    return guard


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
