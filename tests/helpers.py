"""Shared test fixtures: real faults, small models, an in-memory logger."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Poison(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient by ``value`` (NaN or Inf)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: float) -> Tensor:
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return torch.full_like(grad, ctx.value), None


def poison(x: Tensor, value: float) -> Tensor:
    return Poison.apply(x, value)  # type: ignore[no-any-return]


class Once(torch.autograd.Function):
    """Identity forward; only the first backward through it (since :meth:`reset`) is changed: its
    gradient becomes NaN (``factor`` None) or is multiplied by ``factor``. A fault that a replay of the
    step does not see again: a transient one."""

    fired = False

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float | None) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if Once.fired:
            return grad, None
        Once.fired = True
        return (torch.full_like(grad, math.nan) if ctx.factor is None else grad * ctx.factor), None

    @staticmethod
    def reset() -> None:
        Once.fired = False


def once(x: Tensor, factor: float | None = None) -> Tensor:
    """NaN (or ``factor`` times) the gradient through ``x``, on the first backward since ``Once.reset()``."""
    return Once.apply(x, factor)  # type: ignore[no-any-return]


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``factor`` (a vanishing path)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    return ScaleGrad.apply(x, factor)  # type: ignore[no-any-return]


class MemoryLogger(Logger):
    """Records every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> dict[int, float]:
        return {s: m[key] for s, m in self.rows if key in m and s is not None}


def loader(n: int = 64, dim: int = 4, batch: int = 8, seed: int = 0) -> DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class FaultNet(pl.LightningModule):
    """An MLP l0 -> l1 -> l2. ``faults`` maps global_step -> (kind, value):

    * ("grad", layer_index, value): the gradient at the output of layer ``layer_index`` becomes value;
    * ("loss", value): the loss becomes value;
    * ("input", value): the batch is filled with value.
    """

    def __init__(
        self, faults: dict[int, tuple[Any, ...]] | None = None, lr: float = 0.01, optim: str = "adamw"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0 = nn.Linear(4, 8)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 1)
        self.faults = faults or {}
        self.lr = lr
        self.optim = optim
        self.snapshots: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        self.after: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}

    def fault(self) -> tuple[Any, ...] | None:
        return self.faults.get(self.trainer.global_step) if self._trainer is not None else None

    def forward(self, x: Tensor) -> Tensor:
        f = self.fault()
        h = x
        for i, layer in enumerate((self.l0, self.l1, self.l2)):
            h = layer(h)
            if f is not None and f[0] == "grad" and f[1] == i:
                h = poison(h, f[2])
            if i < 2:
                h = torch.tanh(h)
        return h

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        f = self.fault()
        if f is not None and f[0] == "input":
            x = torch.full_like(x, f[1])
        loss = nn.functional.mse_loss(self(x), y)
        if f is not None and f[0] == "loss":
            loss = loss * f[1]
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.snapshots[self.trainer.global_step] = snapshot(self, self.trainer.optimizers[0])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[self.trainer.global_step - 1] = snapshot(self, self.trainer.optimizers[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optim == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=0.1)
        # "adamw_fused": a NaN step is skipped by the optimizer itself (found_inf), with no host read
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, fused=self.optim == "adamw_fused")

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return loader()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, copy.deepcopy(opt.state_dict())


def assert_same_state(a: Any, b: Any) -> None:
    """Bit-identical nested structures of tensors and plain values."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, (a, b)
        same = torch.equal(a, b) or (  # NaN where both hold NaN (an empty slot of a window) is the same
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
        assert same, (a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (set(a), set(b))
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b, (a, b)


def trainer(callbacks: list[pl.Callback], steps: int = 8, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class GradRecorder(pl.Callback):
    """Records the gradients at ``on_before_optimizer_step``: listed before the guard it sees them
    unclipped, listed after it sees what the optimizer will get."""

    def __init__(self) -> None:
        self.grads: dict[int, list[Tensor | None]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads[trainer.global_step] = [None if p.grad is None else p.grad.detach().clone() for p in params]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


@contextmanager
def tensorboard_server(logdir: Path, ready: Callable[[str], bool], timeout: float = 90) -> Iterator[str]:
    """A real ``tensorboard`` on 127.0.0.1 serving ``logdir``; yields its base URL once ``ready(base)``
    holds (or the timeout passed), and kills its process group afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready(base):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def parallelize(model: nn.Module, mesh: Any, *, tensor_parallel: bool, fsdp: bool, units: list[nn.Module]) -> None:
    """The sharding the multi-process scripts use under ModelParallelStrategy: a tensor-parallel plan
    (``l0`` column-wise, ``l1`` row-wise) on ``mesh["tensor_parallel"]``, and/or FSDP2 (``fully_shard``
    of each unit, then of the root) on ``mesh["data_parallel"]``."""
    if tensor_parallel:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh["tensor_parallel"], {"l0": ColwiseParallel(), "l1": RowwiseParallel()})
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit, mesh=mesh["data_parallel"])
        fully_shard(model, mesh=mesh["data_parallel"])


RENDEZVOUS_ERRORS = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "Connection refused")


def launch(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a multi-process test script (Lightning launches its ranks) from the repository root.

    Rendezvous failures are the environment's, not the guard's (a port taken between being found free
    and being bound): only those are retried, once, with a new port.
    """
    for attempt in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}  # fmt: skip
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=script.parents[1])  # fmt: skip
        if attempt == 0 and proc.returncode != 0 and any(e in proc.stderr for e in RENDEZVOUS_ERRORS):
            continue
        break
    return proc


def leave_when_written(rank: int, others: list[Path], timeout: float = 60) -> None:
    """End a launched rank's process at once: rank 0 first waits for the other ranks' result files.

    gloo's threads can abort a normal interpreter exit ("terminate called without an active
    exception"), which has nothing to do with the guard: once every rank has written, leave.
    """
    deadline = time.monotonic() + timeout
    while rank == 0 and not all(f.exists() for f in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
