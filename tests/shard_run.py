"""Run by tests/integrations/test_sharded.py: 2 CPU processes (gloo), each holding a shard of every gradient.

The shards are laid out the way FSDP's flat parameters are: the gradients are flattened and
concatenated, the flat vector is padded and cut into one contiguous chunk per rank, and each
original tensor appears on a rank as the 1-D view of its part of that chunk (empty when the tensor
lies wholly on the other rank). A second model holds ``DTensor`` gradients sharded on dim 0.

Usage: python tests/shard_run.py OUTDIR PORT
Each rank writes OUTDIR/shard<r>.json: what the guard reported and the clipped shards.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

from lightning_gradguard import GuardCore, LayerNormClip, NormClip, ZClip

SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "dec.weight": (3, 6), "dec.bias": (3,), "scale": ()}
WORLD = 2


def full_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    scale = 40.0 if step == 12 else 1.0  # a spike for ZClip
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def spans() -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for k, s in SHAPES.items():
        n = math.prod(s)
        out[k] = (start, start + n)
        start += n
    return out


def shard_of(rank: int, flat: torch.Tensor, name: str) -> torch.Tensor:
    total = sum(math.prod(s) for s in SHAPES.values())
    chunk = -(-total // WORLD)
    lo, hi = rank * chunk, min((rank + 1) * chunk, total)
    a, b = spans()[name]
    s, e = max(a, lo), min(b, hi)
    return flat[s:e] if s < e else flat[0:0]


class Holder(nn.Module):
    """A model whose parameters are this rank's shards, under the original names."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.enc, self.dec = nn.Module(), nn.Module()
        flat = torch.cat([full_grads(0)[k].flatten() for k in SHAPES]) * 0
        for k in SHAPES:
            owner: nn.Module = self
            attr = k
            if "." in k:
                mod, attr = k.split(".")
                owner = getattr(self, mod)
            owner.register_parameter(attr, nn.Parameter(shard_of(rank, flat, k).clone()))

    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


def run_flat(rank: int) -> dict[str, Any]:
    model = Holder(rank)
    named = model.params()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rows: dict[str, Any] = {}
    clips = (
        ("norm", NormClip(1.0)),
        ("none", NormClip(1.0)),
        ("layer", LayerNormClip(1.0)),
        ("zclip", ZClip(warmup_steps=5)),
    )
    for name, clip in clips:
        guard = GuardCore(model, clip=clip, sharded=True, log_every_n_steps=1, track_timesteps=False)
        steps = []
        for step in range(15 if name == "zclip" else 1):
            grads = full_grads(step)
            flat = torch.cat([grads[k].flatten() for k in SHAPES])
            for k, p in named.items():
                shard = shard_of(rank, flat, k).clone()
                # "none": FSDP1 with use_orig_params leaves .grad None where a tensor has no part here
                p.grad = None if name == "none" and shard.numel() == 0 else shard
            report = guard.step(opt)
            steps.append(
                {
                    "metrics": report.metrics,
                    "shards": {k: p.grad.tolist() for k, p in named.items() if p.grad is not None},
                }
            )
        rows[name] = steps
    return rows


def run_dtensor(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4))
    grads = full_grads(0)
    full = {"0.weight": grads["enc.weight"], "0.bias": grads["enc.bias"], "1.weight": torch.ones(4, 6) * 0.5}
    full["1.bias"] = torch.arange(4.0)
    for name, p in model.named_parameters():
        placement = [Replicate()] if name == "1.bias" else [Shard(0)]
        dp = nn.Parameter(distribute_tensor(p.detach(), mesh, placement))
        owner = model[int(name[0])]
        owner.register_parameter(name[2:], dp)
        dp.grad = distribute_tensor(full[name].clone(), mesh, placement)  # clipped in place
    guard = GuardCore(model, clip=NormClip(1.0), log_every_n_steps=1, track_timesteps=False)
    report = guard.step(torch.optim.SGD(model.parameters(), lr=0.0))
    clipped = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
    return {"metrics": report.metrics, "full": {k: v.tolist() for k, v in full.items()}, "clipped": clipped}


def main() -> None:
    out, port = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = {"flat": run_flat(rank), "dtensor": run_dtensor(rank)}
    (out / f"shard{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's device-mesh threads can abort a normal interpreter exit ("terminate called ...")


if __name__ == "__main__":
    main()
