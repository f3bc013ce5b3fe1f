"""GradGuard inside real Lightning runs: faults, policies, AMP, accumulation, manual optimization,
checkpoints and loggers."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision
from torch import Tensor, nn

from lightning_gradguard import GradGuard, GradGuardWarning, NonFiniteGradientError, NormClip, ValueClip
from tests.helpers import FaultNet, GradRecorder, MemoryLogger, assert_same_state, loader, poison, snapshot, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*")


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(("layer", "expected"), [(0, ["l0"]), (1, ["l0", "l1"]), (2, ["l0", "l1", "l2"])])
def test_injected_fault_is_skipped_with_origin(value: float, layer: int, expected: list[str]) -> None:
    model = FaultNet({3: ("grad", layer, value)})
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match=f"step 3 .*origin '{expected[-1]}'"):
        trainer([guard], steps=6).fit(model)
    (event,) = guard.events
    assert (event.kind, event.step, event.origin, list(event.layers)) == ("nonfinite", 3, expected[-1], expected)
    assert event.action == "skipped"
    assert guard.skipped_steps == 1 and guard.nonfinite_steps == 1
    # nothing lost: weights and AdamW state bit-identical across the skipped step ...
    assert_same_state(model.snapshots[3], model.after[3])
    # ... and training went on: the next step changed the weights, which are finite
    assert not torch.equal(model.after[4][0]["l0.weight"], model.after[3][0]["l0.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_and_nan_batch() -> None:
    model = FaultNet({1: ("loss", math.nan), 4: ("input", math.nan)})
    guard = GradGuard()
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=6).fit(model)
    first, second = guard.events
    assert (first.step, first.origin) == (1, "loss")
    assert second.step == 4 and second.origin == "loss"  # a NaN batch makes the loss NaN
    assert guard.skipped_steps == 2
    assert_same_state(model.snapshots[4], model.after[4])


def test_exploding_learning_rate_is_caught() -> None:
    model = FaultNet(lr=1e20, optim="sgd")
    guard = GradGuard(max_consecutive_skips=3)
    with pytest.warns(GradGuardWarning), pytest.raises(NonFiniteGradientError, match="3 consecutive"):
        trainer([guard], steps=30).fit(model)
    assert guard.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_policy_raises_from_fit() -> None:
    model = FaultNet({2: ("grad", 1, math.nan)})
    with pytest.warns(GradGuardWarning), pytest.raises(NonFiniteGradientError, match="origin 'l1'"):
        trainer([GradGuard(on_nonfinite="raise")], steps=6).fit(model)


def test_stop_policy_stops_after_skipping() -> None:
    model = FaultNet({2: ("grad", 0, math.inf)})
    guard = GradGuard(on_nonfinite="stop")
    t = trainer([guard], steps=10)
    with pytest.warns(GradGuardWarning, match="stopping"):
        t.fit(model)
    assert t.global_step == 3 and guard.skipped_steps == 1
    assert_same_state(model.snapshots[2], model.after[2])


def test_warn_policy_lets_the_step_through() -> None:
    model = FaultNet({2: ("grad", 2, math.nan)}, optim="sgd")
    guard = GradGuard(on_nonfinite="warn", log_every_n_steps=100)
    with pytest.warns(GradGuardWarning, match="NOT skipped"):
        trainer([guard], steps=3).fit(model)
    assert guard.skipped_steps == 0 and guard.nonfinite_steps == 1
    assert not torch.isfinite(model.l2.weight).all()


def test_metrics_reach_every_logger_and_match_reference() -> None:
    mem = MemoryLogger()
    recorder = GradRecorder()
    guard = GradGuard(clip=NormClip(0.05), log_every_n_steps=2)

    before = GradRecorder()  # listed before the guard: sees the unclipped gradients
    model = FaultNet()
    trainer([before, guard, recorder], steps=6, logger=[mem]).fit(model)
    steps = sorted(s for s, _ in mem.rows)
    assert steps == [1, 3, 5]
    for step, metrics in mem.rows:
        grads = before.grads[step]
        names = ["l0", "l0", "l1", "l1", "l2", "l2"]
        for layer in ("l0", "l1", "l2"):
            own = [g.flatten() for g, n in zip(grads, names, strict=True) if n == layer]
            ref = torch.linalg.vector_norm(torch.cat(own))
            assert metrics[f"gradguard/layer/{layer}"] == pytest.approx(ref.item(), rel=1e-5)
        total = torch.nn.utils.get_total_norm(grads).item()
        clipped = torch.nn.utils.get_total_norm(recorder.grads[step]).item()
        assert metrics["gradguard/total_norm"] == pytest.approx(total, rel=1e-5)
        assert metrics["gradguard/total_norm_clipped"] == pytest.approx(clipped, rel=1e-5)
        assert metrics["gradguard/clip_coef"] == pytest.approx(min(1, 0.05 / (total + 1e-6)), rel=1e-5)
        assert metrics["gradguard/skipped_steps"] == 0.0 and metrics["gradguard/nonfinite_steps"] == 0.0


def test_logging_steps_follow_trainer_cadence_without_logger() -> None:
    guard = GradGuard()
    seen: list[int] = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if guard.last_report is not None and guard.last_report.layer_norms:
                seen.append(guard.last_report.step)

    trainer([guard, Spy()], steps=12, log_every_n_steps=4, logger=False).fit(FaultNet())
    assert seen == [3, 7, 11]


def test_tensorboard_and_csv_loggers(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    guard = GradGuard(clip=NormClip(1.0))
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=6, logger=[tb, csv], log_every_n_steps=1).fit(FaultNet({2: ("grad", 1, math.nan)}))
    expected = {
        "gradguard/total_norm",
        "gradguard/total_norm_clipped",
        "gradguard/clip_coef",
        "gradguard/layer/l0",
        "gradguard/layer/l1",
        "gradguard/layer/l2",
        "gradguard/skipped_steps",
        "gradguard/nonfinite_steps",
    }
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert expected <= tags
    skipped = [e.value for e in acc.Scalars("gradguard/skipped_steps")]
    assert skipped == [0, 0, 1, 1, 1, 1]
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert expected <= set(header)


def test_gradient_accumulation_measures_once_per_optimizer_step() -> None:
    recorder = GradRecorder()
    mem = MemoryLogger()
    guard = GradGuard()
    model = FaultNet()
    trainer([guard, recorder], steps=3, accumulate_grad_batches=4, logger=[mem]).fit(model)
    assert guard.core.steps == 3
    assert sorted(recorder.grads) == [0, 1, 2]
    for step, metrics in mem.rows:
        ref = torch.nn.utils.get_total_norm(recorder.grads[step]).item()
        assert metrics["gradguard/total_norm"] == pytest.approx(ref, rel=1e-5)


class TwoOptimizers(pl.LightningModule):
    def __init__(self, poison_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = nn.Linear(4, 4)
        self.disc = nn.Linear(4, 1)
        self.poison_step = poison_step
        self.seen_steps: list[int] = []
        # global_step of each discriminator step: (weights and Adam state before, after, its gradients)
        self.disc_steps: dict[int, tuple[Any, Any, list[Tensor]]] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        loss_g = self.gen(x).pow(2).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        h = self.disc(x)
        if self.trainer.global_step == self.poison_step:
            h = poison(h, math.nan)
        opt_d.zero_grad()
        self.manual_backward(h.mean())
        step, before = self.trainer.global_step, snapshot(self.disc, opt_d.optimizer)
        grads = [p.grad.detach().clone() for p in self.disc.parameters()]
        opt_d.step()
        self.disc_steps[step] = (before, snapshot(self.disc, opt_d.optimizer), grads)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.gen.parameters(), lr=0.01), torch.optim.Adam(self.disc.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return loader()


def test_manual_optimization_two_optimizers() -> None:
    """Under manual optimization each ``opt.step()`` is one guarded step (global_step counts both
    optimizers). The NaN on the discriminator's step 5 skips that step only: the discriminator's
    weights and Adam state are exactly as before it; its other steps update; the generator trains on."""
    model = TwoOptimizers(poison_step=5)
    guard = GradGuard(log_every_n_steps=1)
    with pytest.warns(GradGuardWarning, match="optimizer 1"):
        trainer([guard], steps=8).fit(model)
    assert guard.core.steps == 8 and guard.skipped_steps == 1
    (event,) = guard.events
    assert (event.step, event.optimizer_idx, event.origin, event.action) == (5, 1, "disc", "skipped")
    assert sorted(model.disc_steps) == [1, 3, 5, 7]
    before, after, _ = model.disc_steps[5]
    assert_same_state(after, before)  # skipped: nothing moved, not even Adam's step count
    for step in (1, 3, 7):
        before, after, grads = model.disc_steps[step]
        assert not torch.equal(after[0]["weight"], before[0]["weight"])  # a healthy step trains
        assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_amp_overflow_on_cpu() -> None:
    class Overflow(FaultNet):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * 1e30 if self.trainer.global_step == 2 else loss

    model = Overflow()
    guard = GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)  # an AMP overflow is not an alarm
        trainer([guard], steps=5, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(model)
    kinds = [e.kind for e in guard.events]
    assert kinds and set(kinds) == {"amp_overflow"}
    assert 2 in [e.step for e in guard.events]
    assert guard.nonfinite_steps == 0 and guard.skipped_steps == 0
    assert guard.core.amp_overflow_steps == len(kinds)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_resume_keeps_counters(tmp_path: Path) -> None:
    guard = GradGuard(clip=NormClip(0.5))
    with pytest.warns(GradGuardWarning):
        t = trainer([guard], steps=6)
        t.fit(FaultNet({1: ("grad", 0, math.nan), 3: ("loss", math.inf)}))
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][guard.state_key]
    assert saved["skipped_steps"] == 2 and saved["nonfinite_steps"] == 2 and saved["steps"] == 6

    resumed = GradGuard(clip=NormClip(0.5))
    trainer([resumed], steps=9).fit(FaultNet(), ckpt_path=ckpt)
    assert resumed.skipped_steps == 2 and resumed.nonfinite_steps == 2
    assert resumed.core.steps == 9
    assert resumed.core.origins == {"l0": 1, "loss": 1}


def test_two_guards_with_different_config_coexist() -> None:
    a, b = GradGuard(clip=NormClip(1.0)), GradGuard(on_nonfinite="warn", log_every_n_steps=3)
    assert a.state_key != b.state_key
    trainer([a, b], steps=2).fit(FaultNet())
    assert a.core.steps == b.core.steps == 2


def test_pickles_before_and_after_fit() -> None:
    guard = GradGuard(clip=ValueClip(0.1))
    pickle.loads(pickle.dumps(guard))
    trainer([guard], steps=2).fit(FaultNet())
    clone = pickle.loads(pickle.dumps(guard))
    assert clone.core.steps == 2 and clone.clip is not None


def test_double_clipping_warns_once_at_setup() -> None:
    with pytest.warns(UserWarning, match="clipped twice") as record:
        trainer([GradGuard(clip=NormClip(1.0))], steps=2, gradient_clip_val=0.5).fit(FaultNet())
    assert sum("clipped twice" in str(w.message) for w in record) == 1


def test_summary_at_end_of_fit(caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard(clip=NormClip(1e-3))
    with pytest.warns(GradGuardWarning), caplog.at_level("INFO"):
        trainer([guard], steps=5).fit(FaultNet({2: ("grad", 1, math.nan)}))
    text = guard.summary()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradGuard summary")] == [text]
    assert "5 optimizer steps guarded" in text and "4 clipped (80.0%)" in text
    assert "1 skipped" in text and "origins: l1 x1" in text


def test_bad_arguments_at_construction() -> None:
    with pytest.raises(ValueError, match="Expected `log_every_n_steps` to be an int >= 1 or None, but got 0"):
        GradGuard(log_every_n_steps=0)
    with pytest.raises(ValueError, match="`group_by`"):
        GradGuard(group_by="tensor")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`clip`"):
        GradGuard(clip="norm")  # type: ignore[arg-type]
