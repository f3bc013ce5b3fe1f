"""What recovery costs: snapshots every 100 steps, and the device spike check, side by side.

Two of ``bench.py``'s models, (a) the 2-layer LSTM language model and (b) the 6-layer Transformer
encoder, each trained with Adam in a plain PyTorch loop guarded by ``GuardCore`` (log every 50
steps, ``NormClip(1.0)``). Each configuration trains its own copy of the model on the same batch;
they run interleaved, ``rounds`` times ``steps`` steps each (A B C A B C ...), and every optimizer
step is timed:

  guard       GuardCore(clip=NormClip(1.0))
  rollback    the same + rollback=Rollback(every=100, keep=2)   (snapshots in host memory)
  spike skip  the same + skip_spikes=6.0                        (device statistics, no host read)

Reported: each configuration's median step time as a ratio to ``guard`` (with the spread of the
per-round medians), and, measured directly, a snapshot's size, the time to take one and to restore
one, and the snapshot's cost per step at ``every=100`` (take time / 100 / median step time).

    cd benchmarks && ../.venv/bin/python rollback_bench.py      # writes RESULTS-rollback.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench import Encoder  # model (b) (this folder)
from timestep_overhead import LM  # model (a)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import GuardCore, NormClip, Rollback
from lightning_gradguard.core.snapshot import Snapshot, Targets

CONFIGS = ("guard", "rollback", "spike skip")


def make_guard(name: str, model: nn.Module, opt: torch.optim.Optimizer) -> GuardCore:
    extra: dict[str, object] = {}
    if name == "rollback":
        extra["rollback"] = Rollback(every=100, keep=2, skip_file=False)
    elif name == "spike skip":
        extra["skip_spikes"] = 6.0
    guard = GuardCore(model, clip=NormClip(1.0), track_timesteps=False, **extra)  # type: ignore[arg-type]
    guard.prepare(model, [opt])
    return guard


def bench_model(label: str, build: Callable[[], nn.Module], rounds: int, steps: int) -> list[str]:
    torch.manual_seed(0)
    base = build()
    models = {name: copy.deepcopy(base) for name in CONFIGS}
    opts = {name: torch.optim.Adam(models[name].parameters(), lr=1e-4) for name in CONFIGS}
    x = torch.randint(0, 1000, (32, 64))
    y = torch.randint(0, 1000, (32, 64))
    loss_fn = nn.CrossEntropyLoss()
    guards = {name: make_guard(name, models[name], opts[name]) for name in CONFIGS}
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    medians: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name in CONFIGS:
            guard, model, opt, own = guards[name], models[name], opts[name], []
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = loss_fn(model(x).flatten(0, 1), y.flatten())
                guard.observe_loss(loss)
                loss.backward()
                report = guard.step(opt)  # each guard counts its own steps: a snapshot every 100 of them
                if not report.skipped:
                    opt.step()
                own.append(time.perf_counter() - t0)
            times[name] += own[2:]
            medians[name].append(statistics.median(own[2:]))
    base = statistics.median(times["guard"])
    lines = [f"### {label}", "", "| configuration | median step (ratio to guard) | per-round spread |", "|---|---|---|"]
    for name in CONFIGS:
        ratio = statistics.median(times[name]) / base
        lo, hi = min(medians[name]) / base, max(medians[name]) / base
        lines.append(f"| {name} | {ratio:.3f} | {lo:.3f} – {hi:.3f} |")
    guard_alone: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(200):  # GuardCore.step alone, on each copy's last gradients, interleaved
        for name in CONFIGS:
            t0 = time.perf_counter()
            guards[name].step(opts[name])
            guard_alone[name].append(time.perf_counter() - t0)
    alone = {name: statistics.median(v) for name, v in guard_alone.items()}
    targets = Targets(models["guard"], [opts["guard"]])
    takes, restores = [], []
    snap = Snapshot.take(0, targets)
    for _ in range(10):
        t0 = time.perf_counter()
        snap = Snapshot.take(0, targets, reuse=snap)
        takes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        snap.restore(targets)
        restores.append(time.perf_counter() - t0)
    take = statistics.median(takes)
    lines += [
        "",
        f"snapshot: {snap.nbytes / 2**20:.1f} MiB (parameters + Adam state); take {take * 1e3:.1f} ms, "
        f"restore {statistics.median(restores) * 1e3:.1f} ms (medians of 10); median step {base * 1e3:.1f} ms; "
        f"a snapshot every 100 steps costs **{take / 100 / base:.3%}** of the step time.",
        "",
        "`GuardCore.step` alone (200 interleaved calls each, median): "
        + ", ".join(f"{name} {alone[name] * 1e3:.3f} ms" for name in CONFIGS)
        + f"; the spike check adds {(alone['spike skip'] - alone['guard']) / base:.2%} of the step time.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-rollback.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [
        "# Recovery's cost (benchmarks/rollback_bench.py)",
        "",
        f"{dt.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, 2 threads, "
        f"{args.rounds} rounds x {args.steps} steps per configuration, interleaved. The rollback configuration "
        "takes a snapshot at its first step and then every 100 steps, so it took several in the timed steps.",
        "",
    ]
    lines += bench_model("(a) 2-layer LSTM LM", LM, args.rounds, args.steps)
    lines += bench_model("(b) 6-layer Transformer encoder", Encoder, args.rounds, args.steps)
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
