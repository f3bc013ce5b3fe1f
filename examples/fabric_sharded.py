"""GradGuard's core in a sharded Lightning Fabric loop: FSDP2 through Fabric's ModelParallelStrategy.

Two CPU processes (gloo) here; the same code runs on GPUs. Every parameter is a ``DTensor`` shard:
the guard measures the whole tensors (one small all-reduce of per-tensor norms), clips globally,
and skips a poisoned step on every rank (``reduce=`` sums the non-finite flags across ranks).
Build the guard *after* ``fabric.setup``: sharding replaces the parameters.

    python examples/fabric_sharded.py [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import ModelParallelStrategy
from torch import nn

from lightning_gradguard import GradGuardWarning, GuardCore, NormClip


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: each layer, then the root, sharded over the data-parallel ranks."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def main(steps: int = 40, nan_at: int = 10, out: Path | None = None) -> GuardCore:
    strategy = ModelParallelStrategy(shard, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    guard = GuardCore(model, clip=NormClip(max_norm=1.0), log_every_n_steps=5)

    def reduce(flags: torch.Tensor) -> torch.Tensor:
        return fabric.all_reduce(flags, reduce_op="sum")  # type: ignore[return-value]

    g = torch.Generator().manual_seed(fabric.global_rank)  # each rank its own data
    x, y = torch.randn(256, 16, generator=g), torch.randn(256, 1, generator=g)
    rows = []
    for step in range(steps):
        i = torch.randint(0, 256, (32,), generator=g)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[i]), y[i])
        if step == nan_at and fabric.global_rank == 1:  # a fault on one rank only
            loss = loss * math.nan
        guard.observe_loss(loss)
        fabric.backward(loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            report = guard.step(optimizer.optimizer, reduce=reduce)
        grads = [p.grad.full_tensor() for p in model.parameters() if p.grad is not None]  # type: ignore[union-attr]
        if not report.skipped:
            optimizer.step()
        if report.metrics:
            whole = torch.nn.utils.get_total_norm(grads).item()  # after the clip: the whole gradient
            rows.append({"step": step, "metrics": report.metrics, "clipped_whole": whole})
            fabric.print(f"step {step}: total norm {report.metrics['gradguard/total_norm']:.3f}")
    fabric.print(guard.summary())
    if out is not None:
        events = [(e.kind, e.step, e.origin) for e in guard.events]
        result = {"rows": rows, "skipped": guard.skipped_steps, "events": events}
        (out / f"fabric{fabric.global_rank}.json").write_text(json.dumps(result))
    return guard


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    main(args.steps, out=args.out)
