"""No host read on a healthy step: non-finite steps skipped on the device by fused optimizers.
Also: a NaN loss under fp16 is a fault, not an overflow; GradGuard clips fused optimizers under AMP."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard import GradGuard, GradGuardWarning, GuardCore, NonFiniteGradientError, NormClip
from lightning_gradguard.core.decide import can_skip_on_device
from tests.helpers import FaultNet, GradRecorder, assert_same_state, trainer
from tests.hostreads import host_reads


def _setup(fused: bool, policy: str = "skip", **kw: Any) -> tuple[nn.Module, torch.optim.Optimizer, GuardCore]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    return model, opt, GuardCore(model, clip=NormClip(1.0), on_nonfinite=policy, log_every_n_steps=None, **kw)  # type: ignore[arg-type]


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, guard: GuardCore, nan: bool = False) -> Any:
    opt.zero_grad()
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean() * (math.nan if nan else 1.0)
    guard.observe_loss(loss)
    loss.backward()
    report = guard.step(opt)
    opt.step()
    return report


@pytest.mark.parametrize(
    ("fused", "policy", "expected"),
    [(True, "skip", 0), (True, "stop", 0), (False, "skip", 1), (True, "raise", 1), (True, "warn", 0)],
)
def test_host_reads_on_healthy_non_logging_steps(fused: bool, policy: str, expected: int) -> None:
    model, opt, guard = _setup(fused, policy)
    _train_step(model, opt, guard)  # the first step learns the layout and the forward order
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        with host_reads() as calls:
            report = guard.step(opt)
        opt.step()
        assert [c.what for c in calls] == ["Tensor.tolist"] * expected, calls  # HostRead.read_all's, if any
        assert report.deferred == (expected == 0)
        assert not hasattr(opt, "found_inf")  # removed again after the step
    guard.flush()
    assert guard.steps == 6 and guard.skipped_steps == 0


def test_a_nan_step_is_skipped_by_the_fused_optimizer_and_reported_later() -> None:
    model, opt, guard = _setup(fused=True)
    for _ in range(3):
        _train_step(model, opt, guard)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, _opt_state(opt))
    report = _train_step(model, opt, guard, nan=True)
    assert report.deferred and report.event is None  # nothing read yet
    assert_same_state(({k: v.clone() for k, v in model.state_dict().items()}, _opt_state(opt)), before)
    assert all(not torch.isfinite(p.grad).all() for p in model.parameters())  # left for the next zero_grad
    assert guard.events == []
    guard.flush()  # as the next logging step would
    (event,) = guard.events
    assert (event.kind, event.step, event.origin, event.action) == ("nonfinite", 3, "loss", "skipped")
    assert guard.skipped_steps == 1 and guard.nonfinite_steps == 1
    _train_step(model, opt, guard)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _opt_state(opt: torch.optim.Optimizer) -> Any:
    return {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}


class FusedNet(FaultNet):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, fused=True)


class EventCounter(pl.Callback):
    """Listed after the guard: how many events it had recorded by each step."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.counts: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.counts[trainer.global_step] = len(self.guard.events)


def test_lightning_nan_at_a_non_logging_step_is_skipped_on_the_device() -> None:
    model = FusedNet({6: ("grad", 1, math.nan)})
    guard = GradGuard(log_every_n_steps=4)
    counter = EventCounter(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard, counter], steps=10).fit(model)
    weights, state = model.snapshots[6]
    after_w, after_s = model.after[6]
    assert_same_state(after_w, weights)  # weights, moments and step counters bit-identical
    assert_same_state(after_s["state"], state["state"])
    (event,) = guard.events
    assert (event.step, event.origin, event.layers) == (6, "l1", ("l0", "l1"))
    assert counter.counts[6] == 0 and counter.counts[7] == 1  # reported at the next logging step (7)
    assert guard.skipped_steps == 1 and guard.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_device_skips_still_escalate() -> None:
    model = FusedNet({s: ("grad", 1, math.nan) for s in range(2, 20)})
    guard = GradGuard(log_every_n_steps=4, max_consecutive_skips=3)
    with warnings.catch_warnings(), pytest.raises(NonFiniteGradientError, match="3 consecutive optimizer steps"):
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=20).fit(model)
    # steps 2 (on the device), 3 (a logging step) and 4 (on the device) are skipped; step 4's flags are
    # read at logging step 7, where the escalation raises: at most one logging interval late
    assert guard.core.steps == 7 and guard.skipped_steps == 3
    assert guard.events[-1].step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_under_fp16_is_a_fault_not_an_overflow() -> None:
    model = FaultNet({6: ("loss", math.nan)})
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="origin 'loss'"):
        trainer([guard], steps=9, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(model)
    (event,) = [e for e in guard.events if e.step == 6]
    assert (event.kind, event.origin, event.action) == ("nonfinite", "loss", "skipped by the GradScaler")
    fault, replay = event.message.split(" Replay: ")  # the first fault of the run is replayed too
    assert fault.endswith("Step skipped by the GradScaler.") and replay.startswith("data or numerics")
    assert guard.nonfinite_steps == 1 and guard.skipped_steps == 0 and guard.core.origins == {"loss": 1}
    assert not [e for e in guard.events if e.kind == "amp_overflow" and e.step == 6]
    assert_same_state(model.after[6][0], model.snapshots[6][0])  # the scaler skipped it
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_plain_fp16_overflow_stays_amp_overflow() -> None:
    model = FaultNet({2: ("loss", 1e30)})
    guard = GradGuard()
    trainer([guard], steps=4, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(model)
    assert 2 in [e.step for e in guard.events if e.kind == "amp_overflow"] and guard.nonfinite_steps == 0


class ScaledRecorder(GradRecorder):
    """Also records the GradScaler's scale: a fused optimizer's gradients are still scaled here."""

    def __init__(self) -> None:
        super().__init__()
        self.scales: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales[trainer.global_step] = float(scaler.get_scale()) if scaler is not None else 1.0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_refuses_to_clip_fused_optimizers_under_amp_and_gradguard_clips_them(precision: str) -> None:
    plugins = [MixedPrecision(precision, "cpu")]  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping because it performs unscaling"):
        trainer([], steps=2, plugins=plugins, gradient_clip_val=0.01).fit(FusedNet())
    before, after = GradRecorder(), ScaledRecorder()
    guard = GradGuard(clip=NormClip(0.01))
    trainer([before, guard, after], steps=6, plugins=plugins).fit(FusedNet())
    clipped = 0
    for step, grads in after.grads.items():
        total = torch.nn.utils.get_total_norm([g for g in grads if g is not None]) / after.scales[step]
        if not math.isfinite(total):  # an fp16 overflow while the scaler calibrates: the scaler skips it
            continue
        raw = torch.nn.utils.get_total_norm([g for g in before.grads[step] if g is not None]) / after.scales[step]
        assert raw > 0.01 and total == pytest.approx(0.01, rel=1e-3), (step, raw, total)
        clipped += 1
    assert clipped >= 3


def test_which_optimizers_skip_on_the_device() -> None:
    p = [nn.Parameter(torch.ones(2))]
    fused = [torch.optim.Adam(p, fused=True), torch.optim.AdamW(p, fused=True), torch.optim.SGD(p, lr=0.1, fused=True)]
    assert all(can_skip_on_device(o) for o in fused)
    plain = (torch.optim.AdamW(p), torch.optim.SGD(p, lr=0.1), torch.optim.RMSprop(p))
    assert not any(can_skip_on_device(o) for o in plain)
