"""GradGuard's core in a Lightning Fabric loop.

``fabric.backward(loss)``, then ``guard.step(optimizer, scaler=...)``, then ``optimizer.step()``.
Under Fabric's fp16 precision the scaler is ``fabric._precision.scaler`` and Fabric unscales inside
``optimizer.step()``: the guard then measures the still-scaled gradients divided by the scale, and
``NormClip`` stays exact. With several processes pass ``reduce=`` so that every rank skips together.

    python examples/fabric_loop.py [--steps 200]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from lightning_gradguard import GuardCore, NormClip


def main(steps: int = 200, nan_at: int = 50, **fabric_kwargs: Any) -> GuardCore:
    fabric = Fabric(accelerator="cpu", devices=1, **fabric_kwargs)
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    guard = GuardCore(model, clip=NormClip(max_norm=1.0), log_every_n_steps=50)
    scaler = getattr(getattr(fabric, "_precision", None), "scaler", None)
    x, y = torch.randn(512, 16), torch.randn(512, 1)
    for step in range(steps):
        i = torch.randint(0, 512, (32,))
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[i]), y[i])
        if step == nan_at:
            loss = loss * math.nan
        guard.observe_loss(loss)
        fabric.backward(loss)
        reduce = (lambda t: fabric.all_reduce(t, reduce_op="sum")) if fabric.world_size > 1 else None
        report = guard.step(optimizer.optimizer, scaler=scaler, reduce=reduce)
        if not report.skipped:
            optimizer.step()
        if report.metrics:
            fabric.print(f"step {step}: total norm {report.metrics['gradguard/total_norm']:.3f}")
    fabric.print(guard.summary())
    return guard


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
