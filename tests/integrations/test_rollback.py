"""Recovering a Lightning run: a planted divergence survived, a carried hidden state reset by the
module's hook, a skip list that survives SIGKILL and resume, the device spike skip with a fused
optimizer, and the rollback in TensorBoard and in ``gradguard report``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradEvent, GradGuard, GradGuardWarning, NonFiniteGradientError, Rollback
from lightning_gradguard.cli import main as report_main
from tests.helpers import assert_same_state, scale_grad, trainer
from tests.hostreads import host_reads

RESUME = Path(__file__).resolve().parents[1] / "resume_run.py"
pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")


class Regression(pl.LightningModule):
    """A tanh MLP fitting sin(x·w): converges in a few hundred Adam steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4096, 8, generator=g), torch.randn(8, 1, generator=g)
        y = torch.sin(x @ w) + 0.05 * torch.randn(4096, 1, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))


class LRBurst(pl.Callback):
    """The learning rate x1000 for steps 150-152 (a bad schedule blip), 3e-3 otherwise."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 3e-3 * (1000.0 if 150 <= trainer.global_step < 153 else 1.0)


def _fit_regression(burst: bool, rollback: Rollback | None, root: Path) -> tuple[float | str, GradGuard]:
    guard = GradGuard(log_every_n_steps=10, spike_warmup=20, rollback=rollback)
    model = Regression()
    callbacks: list[pl.Callback] = [LRBurst()] if burst else []
    try:
        trainer([*callbacks, guard], steps=400, default_root_dir=str(root)).fit(model)
    except NonFiniteGradientError:
        return "raised", guard
    return sum(model.losses[-50:]) / 50, guard


def test_a_planted_divergence_is_survived_with_rollback(tmp_path: Path) -> None:
    clean, _ = _fit_regression(burst=False, rollback=None, root=tmp_path)
    burst, _ = _fit_regression(burst=True, rollback=None, root=tmp_path)
    assert isinstance(clean, float)
    assert burst == "raised" or burst > 10 * clean  # without rollback the run is ruined
    rollback = Rollback(every=20, spike_zscore=6.0, spike_patience=3)
    saved, guard = _fit_regression(burst=True, rollback=rollback, root=tmp_path)
    assert isinstance(saved, float) and abs(saved - clean) < 0.1 * clean, (saved, clean)
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    assert event.extra["snapshot_step"] < 150 < event.step  # back to before the burst


class CarriedLSTM(pl.LightningModule):
    """Truncated BPTT: the LSTM's hidden state is carried (detached) from batch to batch. Batch 30 holds
    a NaN, which poisons the carried state: every later loss is NaN unless the state is reset."""

    def __init__(self, reset: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.hidden: tuple[Tensor, Tensor] | None = None
        self.reset = reset
        self.rollback_events: list[GradEvent] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = (hidden[0].detach(), hidden[1].detach())
        return nn.functional.mse_loss(self.head(out[:, -1]), y)

    def on_gradguard_rollback(self, event: GradEvent) -> None:
        self.rollback_events.append(event)
        if self.reset:
            self.hidden = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(60 * 4, 5, 3, generator=g), torch.randn(60 * 4, 1, generator=g)
        x[30 * 4 : 31 * 4] = math.nan
        return DataLoader(TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("reset", [False, True])
def test_a_poisoned_carried_state_needs_the_modules_hook(reset: bool, tmp_path: Path) -> None:
    guard = GradGuard(max_consecutive_skips=3, rollback=Rollback(every=10, max_rollbacks=2), log_every_n_steps=10)
    model = CarriedLSTM(reset)
    t = trainer([guard], steps=60, default_root_dir=str(tmp_path))
    if not reset:
        with pytest.raises(NonFiniteGradientError, match="did not recover"):
            t.fit(model)
        assert len(model.rollback_events) == 2  # rolled back twice, the state still NaN: stops
        return
    t.fit(model)
    assert t.global_step == 60 and [e.step for e in model.rollback_events] == [32]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _resume(out: Path, *args: str) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RESUME), str(out), *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=RESUME.parents[1])  # fmt: skip
    return proc.returncode


def test_the_skip_list_and_counters_survive_sigkill_and_resume(tmp_path: Path) -> None:
    assert _resume(tmp_path, "first") == -9  # killed at step 18, after a rollback at step 13
    saved = json.loads((tmp_path / "gradguard_skips.json").read_text())
    assert saved["rollbacks"] == 1
    assert saved["version"] == 2  # one entry per batch, with all its reasons
    assert [(e["batch_idx"], e["steps"], e["reasons"]) for e in saved["skips"]] == [
        (10, [10], ["rolled back"]), (11, [11], ["rolled back"]),
        (12, [12], ["nonfinite", "rolled back"]), (13, [13], ["nonfinite", "rolled back"]),
    ]  # fmt: skip
    ckpt = tmp_path / "ckpt"
    assert _resume(tmp_path, "resume", str(ckpt / "epoch=0-step=15.ckpt"), "after") == 0
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["rollbacks"] == 1 and after["skip_list"] == saved["skips"] and after["events"] == []
    # resumed from before the fault: the recorded batches are skipped again, so the fault never recurs
    assert _resume(tmp_path, "resume", str(ckpt / "epoch=0-step=10.ckpt"), "before") == 0
    before = json.loads((tmp_path / "before.json").read_text())
    assert before["rollbacks"] == 1 and before["events"] == [] and before["global_step"] == 25
    replayed = [(e["step"], e["batch_idx"]) for e in before["skip_list"] if "skip list" in e["reasons"]]
    assert replayed == [(10, 10), (11, 11), (12, 12), (13, 13)]
    assert [s[1] for s in before["seen"][:4]] == [10, 11, 12, 13]  # the same batches, at the same positions


class Spiky(pl.LightningModule):
    """An MLP whose hidden-layer gradient is multiplied by 1e3 at one step: a finite spike."""

    def __init__(self, spike_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1 = nn.Linear(4, 16), nn.Linear(16, 1)
        self.spike_step = spike_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = torch.tanh(self.l0(x))
        if self.trainer.global_step == self.spike_step:
            h = scale_grad(h, 1000.0)
        return nn.functional.mse_loss(self.l1(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(512, 4, generator=g), torch.randn(512, 1, generator=g)), 8)


class StateAround(pl.Callback):
    """The weights and AdamW state at each batch's start and end."""

    def __init__(self) -> None:
        self.start: dict[int, Any] = {}
        self.end: dict[int, Any] = {}

    @staticmethod
    def state(pl_module: pl.LightningModule) -> Any:
        opt = pl_module.trainer.optimizers[0]
        return ({k: v.clone() for k, v in pl_module.state_dict().items()},
                {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()})  # fmt: skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.start[trainer.global_step] = self.state(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.end[trainer.global_step - 1] = self.state(pl_module)


class CountedGuard(GradGuard):
    """Counts the host reads of the guard's own step, per step."""

    reads: dict[int, list[str]]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        with host_reads() as calls:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.reads[trainer.global_step] = list(calls)


def test_a_finite_spike_is_skipped_on_the_device_in_lightning(tmp_path: Path) -> None:
    guard = CountedGuard(skip_spikes=6.0, spike_warmup=10, log_every_n_steps=10)
    guard.reads = {}
    around = StateAround()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        t = trainer([guard, around], steps=30, logger=logger, log_every_n_steps=10, default_root_dir=str(tmp_path))
        t.fit(Spiky(spike_step=15))
    assert_same_state(around.end[15], around.start[15])  # skipped: weights, moments, step counts untouched
    healthy_quiet = [s for s in range(12, 30) if (s + 1) % 10 != 0 and s != 15]
    assert all(guard.reads[s] == [] for s in healthy_quiet), {s: guard.reads[s] for s in healthy_quiet}
    assert guard.reads[15] == []  # the spike itself: skipped on the device, no read
    (event,) = [e for e in guard.events if e.kind == "spike_skipped"]
    assert event.step == 15 and guard.spike_skipped_steps == 1


def test_a_rollback_is_in_tensorboard_and_in_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import FaultNet

    guard = GradGuard(max_consecutive_skips=2, rollback=Rollback(every=4), log_every_n_steps=2)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    model = FaultNet({9: ("loss", math.nan), 10: ("loss", math.nan)})
    trainer([guard], steps=16, logger=logger, log_every_n_steps=2, default_root_dir=str(tmp_path)).fit(model)
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    assert (event.step, event.extra["snapshot_step"]) == (10, 8)
    logger.experiment.flush()
    capsys.readouterr()
    report_main(["report", str(tmp_path / "run"), "--json"])
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["rollbacks"] == [{"step": 10, "snapshot_step": 8, "batches": [[1, 0, 2]], "batch_count": 3,
                                 "cause": "2 consecutive skipped steps (max_consecutive_skips=2)"}]  # fmt: skip
    assert {"step": 9, "reason": "nonfinite"} in rep["skipped_batches"]
    assert any(f["kind"] == "rollback" and f["severity"] == "attention" for f in rep["findings"])
    report_main(["report", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert "  rollback at step 10 to the snapshot of step 8: 2 consecutive" in text
    assert "\n    batches undone: 1:0–1:2 (3 batches)\n" in text
    skips = json.loads((tmp_path / "gradguard_skips.json").read_text())  # beside the logs (default_root_dir)
    assert [(e["step"], e["reasons"]) for e in skips["skips"]] == [
        (8, ["rolled back"]), (9, ["nonfinite", "rolled back"]), (10, ["nonfinite", "rolled back"]),
    ]  # fmt: skip


def test_a_fresh_run_does_not_inherit_an_earlier_runs_skip_list(tmp_path: Path) -> None:
    from tests.helpers import FaultNet

    stale = {"version": 1, "rollbacks": 2, "lr_scale": 1.0,
             "skips": [{"epoch": 0, "batch_idx": 1, "step": 1, "reason": "rolled back"}]}  # fmt: skip
    (tmp_path / "gradguard_skips.json").write_text(json.dumps(stale))
    guard = GradGuard(rollback=Rollback(every=4))
    trainer([guard], steps=4, default_root_dir=str(tmp_path)).fit(FaultNet())
    assert guard.skip_list == [] and guard.rollbacks == 0 and guard.skipped_steps == 0
    assert json.loads((tmp_path / "gradguard_skips.json").read_text())["skips"] == []


def test_under_gradient_accumulation_every_micro_batch_is_in_the_skip_list(tmp_path: Path) -> None:
    from tests.helpers import FaultNet

    guard = GradGuard(max_consecutive_skips=1, rollback=Rollback(every=2), log_every_n_steps=None)
    t = trainer([guard], steps=6, accumulate_grad_batches=2, default_root_dir=str(tmp_path))
    t.fit(FaultNet({3: ("loss", math.nan)}))
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    assert (event.step, event.extra["snapshot_step"]) == (3, 2)
    assert event.extra["batch_ranges"] == [[0, 4, 7]]  # steps 2 and 3, two micro-batches each
    assert event.extra["batch_count"] == 4
    assert [(e["batch_idx"], e["step"], e["reasons"]) for e in guard.skip_list] == [
        (4, 2, ["rolled back"]), (5, 2, ["rolled back"]),
        (6, 3, ["nonfinite", "rolled back"]), (7, 3, ["nonfinite", "rolled back"]),
    ]  # fmt: skip
