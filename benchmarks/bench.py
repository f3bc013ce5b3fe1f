"""GradGuard's overhead against Lightning's own tools, side by side in one process.

Every configuration of a model runs interleaved (A B C ... A B C ...): each round is one short
``Trainer.fit`` per configuration; a callback times every optimizer step (``on_train_batch_start``
to ``on_train_batch_end``), the first ``warmup`` steps of each fit are dropped, and the median over
all rounds is reported as a ratio to the bare Trainer, with the min and max of the per-round
medians. A small in-memory logger receives every logged metric in every configuration.

Models: (a) a 2-layer LSTM language model (vocab 1000, emb 128, hidden 256, seq 64, batch 32),
(b) a 6-layer Transformer encoder (d=128, 4 heads, 77 parameter tensors), (c) an MLP of 200 small
Linear layers (400 tensors).

Configurations:
  1 bare       Trainer()
  2 clip       Trainer(gradient_clip_val=1.0)
  3 lightning  self.log_dict(grad_norm(self, 2)) every step + gradient_clip_val (Lightning's docs)
  4 guard      GradGuard(clip=NormClip(1.0)), defaults: log every 50 steps, NaN guard every step
  5 guard-log  the same, per-layer norms logged every step
  6 guard-ts   the same with per-timestep tracking, logging every step (model a)
  7 anomaly    Trainer(detect_anomaly=True)
  8 zclip      GradGuard(clip=ZClip())

Also: the guard's own per-step cost (``GuardCore.step`` alone) at 10, 100 and 1000 parameter
tensors, and, on CUDA, host syncs per step (``torch.cuda.set_sync_debug_mode``).

    python benchmarks/bench.py                       # CPU, writes benchmarks/RESULTS.md
    python benchmarks/bench.py --device cuda --out benchmarks/RESULTS-gpu.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import grad_norm
from timestep_overhead import LM  # model (a): the 2-layer LSTM language model (this folder)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import GradGuard, GuardCore, NormClip, ZClip


# ------------------------------------------------------------------- models
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 128)
        layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
        self.out = nn.Linear(128, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.encoder(self.embed(x)))  # type: ignore[no-any-return]


class DeepMLP(nn.Module):
    def __init__(self, depth: int = 200, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x
        return x


MODELS: dict[str, Callable[[], nn.Module]] = {"a: LSTM LM": LM, "b: Transformer": Encoder, "c: MLP x200": DeepMLP}


class Batches(Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, model: str, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        if model.startswith("c"):
            self.x = torch.randn(n, 64, 32, generator=g)
            self.y = torch.randn(n, 64, 32, generator=g)
        else:
            self.x = torch.randint(0, 1000, (n, 32, 64), generator=g)
            self.y = torch.randint(0, 1000, (n, 32, 64), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class Module(pl.LightningModule):
    def __init__(self, model: str, log_grad_norm: bool = False, fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MODELS[model]()
        self.kind = model
        self.log_grad_norm = log_grad_norm
        self.fused = fused

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        if self.kind.startswith("c"):
            return nn.functional.mse_loss(out, y)
        return nn.functional.cross_entropy(out.reshape(-1, 1000), y.reshape(-1))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.log_grad_norm:  # Lightning's documented pattern
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, fused=self.fused or None)


class NullLogger(Logger):
    """Receives every metric (so that logging is paid for) and keeps only a count."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class StepTimer(pl.Callback):
    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._t)


CONFIGS: dict[str, str] = {
    "1 bare": "Trainer()",
    "2 clip": "Trainer(gradient_clip_val=1.0)",
    "3 lightning": "log_dict(grad_norm(self, 2)) every step + gradient_clip_val",
    "4 guard": "GradGuard(clip=NormClip(1.0)), defaults",
    "4w guard-warn": "GradGuard(clip=NormClip(1.0), on_nonfinite='warn'): no host sync off logging steps",
    "5 guard-log": "GradGuard(clip=NormClip(1.0)), per-layer logged every step",
    "6 guard-ts": "GradGuard(clip=NormClip(1.0)) + per-timestep, every step",
    "7 anomaly": "Trainer(detect_anomaly=True)",
    "8 zclip": "GradGuard(clip=ZClip())",
    "2f clip-fused": "Trainer(gradient_clip_val=1.0), SGD(fused=True)",
    "4f guard-fused": "GradGuard(clip=NormClip(1.0)), SGD(fused=True): NaN steps skipped on the device, no host read",
}


def build(config: str, model: str, steps: int, device: str) -> tuple[pl.Trainer, Module, StepTimer]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timer = StepTimer(sync)
    callbacks: list[pl.Callback] = []
    kwargs: dict[str, Any] = {}
    log_every = 50
    if config.startswith("2") or config.startswith("3"):
        kwargs["gradient_clip_val"] = 1.0
    if config.startswith("3"):
        log_every = 1
    if config in ("4 guard", "4f guard-fused"):
        callbacks.append(GradGuard(clip=NormClip(1.0), track_timesteps=False))
    if config.startswith("4w"):
        callbacks.append(GradGuard(clip=NormClip(1.0), track_timesteps=False, on_nonfinite="warn"))
    if config.startswith("5"):
        callbacks.append(GradGuard(clip=NormClip(1.0), log_every_n_steps=1, track_timesteps=False))
    if config.startswith("6"):
        callbacks.append(GradGuard(clip=NormClip(1.0), log_every_n_steps=1, track_timesteps=True))
    if config.startswith("7"):
        kwargs["detect_anomaly"] = True
    if config.startswith("8"):
        callbacks.append(GradGuard(clip=ZClip(), track_timesteps=False))
    callbacks.append(timer)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=NullLogger(),
        callbacks=callbacks,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    return trainer, Module(model, log_grad_norm=config.startswith("3"), fused=config[1:2] == "f"), timer


def interleaved(model: str, configs: list[str], rounds: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    per_round: dict[str, list[float]] = {c: [] for c in configs}
    data = Batches(model, steps)
    for _ in range(rounds):
        for config in configs:
            trainer, module, timer = build(config, model, steps, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))
            per_round[config].append(statistics.median(timer.times[warmup:]))
    out = {}
    for config, meds in per_round.items():
        # paired: each round's median against the bare Trainer's in the same round (cancels drift)
        ratios = [m / b for m, b in zip(meds, per_round[configs[0]], strict=True)]
        out[config] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "ms": statistics.median(meds) * 1e3,
        }
    return out


def guard_cost_scaling(
    device: str, sizes: tuple[int, ...] = (10, 100, 1000), reps: int = 200
) -> dict[int, tuple[float, float]]:
    """Median microseconds of one ``GuardCore.step`` (NormClip, non-logging step) per tensor count,
    next to ``clip_grad_norm_`` on the same tensors (interleaved)."""
    out: dict[int, tuple[float, float]] = {}
    for n in sizes:
        params = [nn.Parameter(torch.randn(64, device=device)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(params, lr=0.0)
        core = GuardCore(clip=NormClip(1.0), log_every_n_steps=None, track_timesteps=False)
        ours: list[float] = []
        torch_ref: list[float] = []
        pairs: list[tuple[Callable[[], Any], list[float]]] = [
            (functools.partial(core.step, opt), ours),
            (functools.partial(nn.utils.clip_grad_norm_, params, 1.0), torch_ref),
        ]
        for i in range(reps + 20):
            for fn, sink in pairs:
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 20:
                    sink.append(time.perf_counter() - t)
        out[n] = (statistics.median(ours) * 1e6, statistics.median(torch_ref) * 1e6)
    return out


def count_syncs(model: str, configs: list[str], steps: int = 12) -> dict[str, float]:
    """Host syncs per step on CUDA: whole steps with sync debug mode "warn", minus the bare Trainer."""

    class Counter(pl.Callback):
        def __init__(self) -> None:
            self.counts: list[int] = []
            self._ctx: Any = None
            self._rec: list[Any] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self._ctx = warnings.catch_warnings(record=True)
            self._rec = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, *args: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")
            self._ctx.__exit__(None, None, None)
            self.counts.append(sum("synchroniz" in str(w.message) for w in self._rec))

    out: dict[str, float] = {}
    for config in configs:
        trainer, module, _ = build(config, model, steps, "cuda")
        counter = Counter()
        trainer.callbacks.append(counter)  # type: ignore[attr-defined]
        trainer.fit(module, DataLoader(Batches(model, steps), batch_size=None))
        out[config] = statistics.mean(counter.counts[2:])
    return out


def count_host_reads(model: str, configs: list[str], steps: int = 12) -> dict[str, float]:
    """Host reads per optimizer step made by lightning_gradguard's own code, on any device
    (tests/hostreads.py): ops whose result is a host value (``.item()``, ``bool(tensor)``, ``torch.equal``...)
    or whose size depends on the values (``nonzero``, boolean masks...), copies the host waits for, and
    ``.tolist()``/``.numpy()``/``.cpu()``...; each with a package frame on its stack."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.hostreads import host_reads_from_the_package

    class PerStep(pl.Callback):
        def __init__(self, calls: list[str]) -> None:
            self.calls, self.counts, self._mark = calls, [], 0

        def on_train_batch_start(self, *args: Any) -> None:
            self._mark = len(self.calls)

        def on_train_batch_end(self, *args: Any) -> None:
            self.counts.append(len(self.calls) - self._mark)

    out: dict[str, float] = {}
    for config in configs:
        trainer, module, _ = build(config, model, steps, "cpu")
        with host_reads_from_the_package() as calls, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counter = PerStep(calls)
            trainer.callbacks.append(counter)  # type: ignore[attr-defined]
            trainer.fit(module, DataLoader(Batches(model, steps), batch_size=None))
        out[config] = statistics.mean(counter.counts[2:])
    return out


def sharded_ratio(rounds: int = 5, steps: int = 12) -> dict[str, Any]:
    """benchmarks/sharded_bench.py in 2 CPU processes (FSDP2): GradGuard vs clip_grad_norm_."""
    import json
    import socket
    import subprocess
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sharded.json"
        script = Path(__file__).with_name("sharded_bench.py")
        cmd = [sys.executable, str(script), str(out), "--rounds", str(rounds), "--steps", str(steps)]
        subprocess.run(cmd, env=env, capture_output=True, timeout=1200, check=True)
        return dict(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per fit (per round)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--models", default="abc", help="which models to run, e.g. 'b' (targets need a and b)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    started = time.perf_counter()
    plan = {
        "b: Transformer": [
            "1 bare", "2 clip", "3 lightning", "4 guard", "4w guard-warn", "5 guard-log", "7 anomaly", "8 zclip",
            "2f clip-fused", "4f guard-fused",
        ],
        "a: LSTM LM": ["1 bare", "2 clip", "4 guard", "6 guard-ts"],
        "c: MLP x200": ["1 bare", "2 clip", "3 lightning", "4 guard", "5 guard-log"],
    }
    plan = {m: cs for m, cs in plan.items() if m[0] in args.models}
    results = {m: interleaved(m, cs, args.rounds, args.steps, args.warmup, args.device) for m, cs in plan.items()}
    scaling = guard_cost_scaling(args.device)
    sync_configs = ["1 bare", "2 clip", "3 lightning", "4 guard", "4w guard-warn", "5 guard-log", "8 zclip"]
    syncs = count_syncs("b: Transformer", [*sync_configs, "4f guard-fused"]) if args.device == "cuda" else {}
    reads = count_host_reads("b: Transformer", [*sync_configs, "2f clip-fused", "4f guard-fused"])
    sharded = sharded_ratio() if args.device == "cpu" else None
    elapsed = time.perf_counter() - started

    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        "# GradGuard benchmark results",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine} ({args.device})",
        f"- torch {torch.__version__}, pytorch-lightning {pl.__version__}, Python {platform.python_version()}",
        f"- command: `python benchmarks/bench.py --device {args.device} --models {args.models}` "
        f"({args.rounds} interleaved rounds x {args.steps} steps, first {args.warmup} of each dropped; "
        f"took {elapsed:.0f} s)",
        "",
        "Step time as a ratio to the bare Trainer of the same model, measured side by side in one process: "
        "each round's median step time over the bare Trainer's in the same round; the median over rounds, "
        "with the min and max in brackets. Target ratios between two configurations divide their medians.",
        "",
    ]
    for m, res in results.items():
        head = "| configuration | ratio | [min, max] | median step | guard host reads per step |"
        lines += [f"## Model {m}", "", head, "|---|---|---|---|---|"]
        for config, r in res.items():
            read = f"{reads[config]:.2f}" if m.startswith("b") and config in reads else "-"
            lines.append(
                f"| {config}: {CONFIGS[config]} | {r['median']:.3f} | [{r['min']:.3f}, {r['max']:.3f}] | "
                f"{r['ms']:.2f} ms | {read} |"
            )
        lines.append("")
    lines += [
        "Guard host reads per step: device-to-host reads by lightning_gradguard's own code (`.tolist()`, "
        "`.item()`, `bool(tensor)`, `torch.equal`, boolean masks, copies to the host, ...), counted by "
        "tests/hostreads.py (a TorchDispatchMode and the Tensor methods that read without an op) over 10 "
        "steps at the default logging cadence (50): each is a sync on a GPU.",
        "",
    ]
    b = results.get("b: Transformer")
    a = results.get("a: LSTM LM")
    targets = [("guard cost 1000 vs 10 tensors", scaling[1000][0] / scaling[10][0], "<= 3")]
    if b is not None:
        targets[:0] = [
            ("config 4 vs config 2 (b)", b["4 guard"]["median"] / b["2 clip"]["median"], "<= 1.02"),
            ("config 5 vs config 3 (b)", b["5 guard-log"]["median"] / b["3 lightning"]["median"], "<= 1.00"),
            ("config 7 vs config 4 (b)", b["7 anomaly"]["median"] / b["4 guard"]["median"], ">= 1.5"),
            ("config 4f vs config 2f (b)", b["4f guard-fused"]["median"] / b["2f clip-fused"]["median"], "<= 1.02"),
            ("config 4f host reads per step (b)", reads["4f guard-fused"], "<= 0"),
        ]
    if a is not None:
        targets.insert(-1, ("config 6 vs config 2 (a)", a["6 guard-ts"]["median"] / a["2 clip"]["median"], "<= 1.05"))
    if sharded is not None:
        targets.insert(-1, ("FSDP2, 2 processes: GradGuard vs clip_grad_norm_", sharded["ratio"], "<= 1.05"))
        lines += [
            "## Sharded: FSDP2 (ModelParallelStrategy), 2 CPU processes (gloo), 8 x 256 MLP",
            "",
            f"`python benchmarks/sharded_bench.py` ({sharded['rounds']} interleaved rounds x {sharded['steps']} "
            "steps): GradGuard(clip=NormClip(1.0)) against clip_grad_norm_(self.parameters(), 1.0) in "
            "configure_gradient_clipping.",
            "",
            "| configuration | median step | ratio [min, max] |",
            "|---|---|---|",
            f"| clip_grad_norm_ | {sharded['ms']['clip_grad_norm_']:.2f} ms | 1.000 |",
            f"| GradGuard | {sharded['ms']['GradGuard']:.2f} ms | {sharded['ratio']:.3f} "
            f"[{sharded['min']:.3f}, {sharded['max']:.3f}] |",
            "",
        ]
    lines += ["## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
    for what, value, target in targets:
        op, bound = target.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
        lines.append(f"| {what} | {value:.3f} | {target} | {'yes' if met else 'no'} |")
    lines += [
        "",
        "## The guard's own cost per step (GuardCore.step, NormClip, non-logging step, 64-element tensors)",
        "",
        "| tensors | GuardCore.step (µs) | clip_grad_norm_ alone (µs) |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {us:.1f} | {ref:.1f} |" for n, (us, ref) in scaling.items()]
    if syncs:
        base = syncs["1 bare"]
        lines += [
            "",
            "## Host syncs per step (CUDA, `torch.cuda.set_sync_debug_mode('warn')`, model b)",
            "",
            "| configuration | syncs per step | above the bare Trainer |",
            "|---|---|---|",
        ]
        lines += [f"| {c} | {v:.2f} | {v - base:+.2f} |" for c, v in syncs.items()]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    if any(math.isnan(v) for _, v, _ in targets):
        raise SystemExit("a measurement failed")


if __name__ == "__main__":
    main()
