"""What the replica check costs: its checksums and the larger collective on a check step, as a fraction
of the step, amortized at a check every 50 steps; and the host reads of a step that is not a check step.

Two of ``bench.py``'s models, (a) the 2-layer LSTM language model and (b) the 6-layer Transformer
encoder, under ``DistributedDataParallel`` on 2 CPU processes (gloo), each trained in a plain loop with
Adam and ``GuardCore(clip=NormClip(1.0))``, its ``reduce`` an ``all_reduce`` (as the Lightning adapter
passes the strategy's). Interleaved ``rounds`` times (A B A B ...), a whole step (forward, backward,
the guard's step, the optimizer's step) is timed with

  off     ``replicas=None`` (the default)
  check   ``replicas=Replicas()``, every step a check step (``log_every_n_steps=1``)

and, on their own, the check's two parts: ``checksums`` of every parameter (the per-layer bit sums) and
the flags' ``all_reduce`` with the ``world x layers x 2`` table beside them against without it.

Reported (rank 0; both ranks run the same steps): the medians, the check's extra on a check step as a
fraction of the step, that fraction amortized at one check every 50 steps (target: at most 0.5%), and
the host reads of a non-check step with the check on and off (``tests/hostreads.py``, counted on rank
0 around the guard's step: the check must add none).

    cd benchmarks && ../.venv/bin/python replica_bench.py        # writes RESULTS-replicas.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench import Encoder  # model (b) (this folder)
from timestep_overhead import LM  # model (a)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import GuardCore, NormClip, Replicas
from lightning_gradguard.core.replicas import checksums

MODELS: dict[str, Callable[[], nn.Module]] = {"a: LSTM LM": LM, "b: Transformer": Encoder}
EVERY = 50  # the amortized figure: one check step every EVERY steps
FLAGS = 8  # about the values a step's flags collective sums without the check
REPEAT = 10  # all_reduces per timing (one takes a fraction of a millisecond)


def _reduce(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _bench_model(name: str, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DistributedDataParallel(MODELS[name]())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randint(0, 1000, (16, 64), generator=g), torch.randint(0, 1000, (16, 64), generator=g)
    guards = {
        "off": GuardCore(clip=NormClip(1.0), track_timesteps=False, log_every_n_steps=1),
        "check": GuardCore(clip=NormClip(1.0), track_timesteps=False, log_every_n_steps=1, replicas=Replicas()),
    }
    for guard in guards.values():
        guard.prepare(model, [opt])

    def step(guard: GuardCore, log: bool = True) -> float:
        """One step; the seconds its guard's step took."""
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        dist.barrier()  # the guard's step timed from the same moment on every rank
        t0 = time.perf_counter()
        guard.step(opt, reduce=_reduce, log=log)
        took = time.perf_counter() - t0
        opt.step()
        return took

    times: dict[str, list[float]] = {k: [] for k in guards}
    guard_times: dict[str, list[float]] = {k: [] for k in guards}
    for _ in range(3):  # warm-up
        for guard in guards.values():
            step(guard)
    for _ in range(rounds):
        for key, guard in guards.items():
            dist.barrier()
            t0 = time.perf_counter()
            guard_times[key].append(step(guard))
            times[key].append(time.perf_counter() - t0)

    (check,) = [c for c in guards["check"].components if c.name == "replicas"]
    assert check.checks >= rounds and check.divergences == 0, (check.checks, check.divergences)  # it did check
    params = list(model.parameters())
    slots = len(params)  # the parts' timing: one slot per parameter, an upper bound on the layers' count
    world = dist.get_world_size()
    parts: dict[str, list[float]] = {"checksums": [], "reduce with table": [], "reduce without": []}
    sizes = {"reduce with table": FLAGS + world * slots * 2, "reduce without": FLAGS}
    for i in range(rounds):
        t0 = time.perf_counter()
        checksums(params, list(range(slots)), slots, torch.device("cpu"))
        parts["checksums"].append(time.perf_counter() - t0)
        for key in sorted(sizes, reverse=bool(i % 2)):  # alternating which goes first
            buf = torch.zeros(sizes[key])
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(REPEAT):
                dist.all_reduce(buf)
            parts[key].append((time.perf_counter() - t0) / REPEAT)

    reads = {}
    if dist.get_rank() == 0:
        from tests.hostreads import host_reads_from_the_package

        for key, guard in guards.items():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            dist.barrier()  # as step() does on rank 1
            with host_reads_from_the_package() as calls:
                guard.step(opt, reduce=_reduce, log=False)
            opt.step()
            reads[key] = len(calls)
    else:
        for guard in guards.values():
            step(guard, log=False)
    return {
        "step": {k: _median_ms(v) for k, v in times.items()},
        "guard": {k: _median_ms(v) for k, v in guard_times.items()},
        "parts": {k: _median_ms(v) for k, v in parts.items()},
        "reads": reads,
        "params": slots,
    }


def _worker(rank: int, world: int, port: int, rounds: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _bench_model(name, rounds) for name in MODELS}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-replicas.md")))
    args = parser.parse_args()
    world, port = 2, 29500 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "results.pt")
        mp.spawn(_worker, args=(world, port, args.rounds, path), nprocs=world, join=True)
        results: dict[str, Any] = torch.load(path)
    rows = []
    for name, r in results.items():
        step = r["step"]["off"]
        extra = r["guard"]["check"] - r["guard"]["off"]
        parts = r["parts"]["checksums"] + r["parts"]["reduce with table"] - r["parts"]["reduce without"]
        rows.append(
            f"| {name} | {r['params']} | {step:.1f} | {r['guard']['off']:.2f} / {r['guard']['check']:.2f} | "
            f"{extra:+.2f} ({100 * extra / step:+.2f}%) | {100 * extra / step / EVERY:.3f}% | "
            f"{r['parts']['checksums']:.2f} + {r['parts']['reduce with table'] - r['parts']['reduce without']:.2f}"
            f" = {parts:.2f} ({100 * parts / step:.2f}%) | {r['reads'].get('off')} / {r['reads'].get('check')} |"
        )
    text = "\n".join(
        [
            "# The replica check's cost",
            "",
            f"`cd benchmarks && ../.venv/bin/python replica_bench.py --rounds {args.rounds}` on "
            f"{dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"2 processes (gloo, 1 thread each), DDP, Adam, `GuardCore(clip=NormClip(1.0))`; medians of "
            f"{args.rounds} interleaved rounds, rank 0's.",
            "",
            "| model | parameters | whole step, check off (ms) | the guard's step, check off / on every step (ms) "
            f"| a check step's extra (ms, % of the step) | amortized, a check every {EVERY} "
            "| the check's parts alone: checksums + larger all_reduce (ms, % of the step) "
            "| host reads of a non-check step, off / on |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "The extra is the difference of the guard's step with the check and without it, in the same run, "
            "interleaved; the parts are the check's own work timed alone (the checksums of every parameter, and "
            "the flags' `all_reduce` with the `world x parameters x 2` table against without it), a cross-check. "
            "A step that is not a check step runs none of it: its host reads are the same with the check on and off.",
            "",
        ]
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
