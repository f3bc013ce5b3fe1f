"""Detection (exploding, spike, vanishing, dead, unused, loss-scale collapse), alerts and dumps."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    GradEvent,
    GradGuard,
    GradGuardError,
    GradGuardWarning,
    GuardCore,
    NonFiniteGradientError,
    load_dump,
)
from lightning_gradguard.dump import restore_rng
from tests.helpers import FaultNet, scale_grad, trainer


def core_with_norm(**kwargs: Any) -> tuple[GuardCore, nn.Parameter, torch.optim.Optimizer]:
    p = nn.Parameter(torch.zeros(4))
    guard = GuardCore(log_every_n_steps=None, track_timesteps=False, **kwargs)
    return guard, p, torch.optim.SGD([p], lr=0.0)


def step_with_norm(guard: GuardCore, p: nn.Parameter, opt: torch.optim.Optimizer, norm: float) -> Any:
    p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
    return guard.step(opt)


# ---------------------------------------------------------------- exploding
def test_exploding_fires_above_the_threshold_only() -> None:
    guard, p, opt = core_with_norm(explode_threshold=5.0, spike_zscore=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        for norm in (1.0, 5.0, 4.999, 5.001, 100.0):
            step_with_norm(guard, p, opt, norm)
    assert [(e.kind, e.step, e.value) for e in guard.events] == [
        ("exploding", 3, pytest.approx(5.001)),
        ("exploding", 4, 100.0),
    ]


# ------------------------------------------------------------------ spikes
def test_one_spike_after_warmup_gives_exactly_one_event_and_nan_leaves_stats() -> None:
    guard, p, opt = core_with_norm(spike_warmup=50)
    g = torch.Generator().manual_seed(0)
    norms = [float(1.0 + 0.05 * torch.randn((), generator=g)) for _ in range(120)]
    norms[70] *= 20.0
    norms[100] *= 20.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        for step, norm in enumerate(norms):
            if step == 80:
                assert guard.spike is not None
                before = guard.spike.stats
                step_with_norm(guard, p, opt, math.nan)  # skipped: never enters the statistics
                assert guard.spike.stats == before
            step_with_norm(guard, p, opt, norm)
    spikes = [e for e in guard.events if e.kind == "spike"]
    assert [e.step for e in spikes] == [70, 101]  # the NaN step shifted later steps by one
    assert all(e.value > 6.0 for e in spikes)
    assert spikes[0].extra["total_norm"] == pytest.approx(norms[70], rel=1e-6)


def test_spike_names_the_layer_that_grew() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    guard = GuardCore(model, spike_warmup=20, log_every_n_steps=5, track_timesteps=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        for step in range(40):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if step == 35:
                model[1].weight.grad.mul_(1e4)  # layer "1" blows up
            guard.step(opt)
    (spike,) = [e for e in guard.events if e.kind == "spike"]
    assert spike.step == 35 and spike.layers[0] == "1" and spike.origin == "1"


# --------------------------------------------------- vanishing, dead, unused
class Wired(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Linear(4, 4)
        self.late = nn.Linear(4, 1)
        self.zeroed = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)  # never used: requires grad, gets none

    def forward(self, x: Tensor) -> Tensor:
        h = self.early(x)
        h = scale_grad(h, 1e-12)  # everything before this point gets a 1e-12 gradient
        h = h + 0.0 * self.zeroed(x)  # exactly-zero gradient for `zeroed`
        return self.late(torch.tanh(h))  # type: ignore[no-any-return]


def test_vanishing_after_patience_dead_and_unused_once() -> None:
    torch.manual_seed(0)
    model = Wired()
    guard = GuardCore(model, vanish_patience=3, log_every_n_steps=2, track_timesteps=False, spike_zscore=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        for _ in range(12):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            guard.step(opt)
    events = [(e.kind, e.step, e.layers) for e in guard.events]
    assert events == [
        ("dead", 1, ("zeroed",)),
        ("unused", 1, ("branch",)),
        ("vanishing", 5, ("early",)),  # logging steps 1, 3, 5: the third in a row
    ]


def test_vanish_ratio_uses_weight_norms() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    guard = GuardCore(model, vanish_ratio=1e-6, vanish_patience=1, log_every_n_steps=1, track_timesteps=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    for q in model[0].parameters():  # ‖g‖ ~1e-7: above vanish_threshold (1e-8), but ‖g‖/‖w‖ < 1e-6
        assert q.grad is not None
        q.grad.mul_(1e-7)
    g0 = torch.nn.utils.get_total_norm([q.grad for q in model[0].parameters() if q.grad is not None])
    w0 = torch.nn.utils.get_total_norm(list(model[0].parameters()))
    assert g0 > 1e-8 and g0 / w0 < 1e-6
    with pytest.warns(GradGuardWarning, match="vanishing"):
        guard.step(opt)
    assert [(e.kind, e.layers) for e in guard.events] == [("vanishing", ("0",))]


# ----------------------------------------------------- rate limit, handlers
def test_500_spikes_give_at_most_5_log_records_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[GradEvent] = []
    guard, p, opt = core_with_norm(spike_zscore=1e-3, spike_warmup=2, alert_handlers=[seen.append])
    caplog.set_level(logging.INFO, logger="lightning_gradguard")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_with_norm(guard, p, opt, 1.0)
        step_with_norm(guard, p, opt, 1.1)
        for i in range(500):
            step_with_norm(guard, p, opt, 1.2 * math.exp(0.05 * i))  # always above its own EMA
    spikes = [e for e in guard.events if e.kind == "spike"]
    # a spike that lasts 8 flagged steps is a new level: the statistics start again (a warm-up of 2),
    # so 8 of every 10 steps are spikes
    assert len(spikes) == len(seen) == 400
    records = [r for r in caplog.records if r.name == "lightning_gradguard"]
    assert 1 <= len(records) <= 5
    assert "79 similar alerts suppressed" in records[1].getMessage()  # the 80 spikes of steps 2..101, but one
    assert len([w for w in caught if issubclass(w.category, GradGuardWarning)]) == len(records)
    assert guard.alerts.suppressed["spike"] == 400 - len(records)
    assert f"{400 - len(records)} repeated alerts were rate-limited" in guard.summary()


def test_a_raising_handler_is_logged_once_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    got: list[str] = []

    def broken(event: GradEvent) -> None:
        raise RuntimeError("webhook down")

    guard = GradGuard(alert_handlers=[broken, lambda e: got.append(e.kind)], alert_every=1)
    faults = {1: ("grad", 0, math.nan), 3: ("loss", math.inf), 5: ("grad", 2, math.inf)}
    with pytest.warns(GradGuardWarning):
        t = trainer([guard], steps=7)
        t.fit(FaultNet(faults))
    assert t.global_step == 7
    assert got == ["nonfinite", "nonfinite", "nonfinite"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "alert handler" in r.getMessage()]
    assert len(errors) == 1


def test_raise_policy_still_raises_with_handlers() -> None:
    seen: list[str] = []
    guard = GradGuard(on_nonfinite="raise", alert_handlers=[lambda e: seen.append(e.kind)])
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient at step 1") as info, \
            warnings.catch_warnings():  # fmt: skip
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=4).fit(FaultNet({1: ("loss", math.nan)}))
    assert info.value.event is not None and (info.value.event.step, info.value.event.origin) == (1, "loss")
    assert seen == ["nonfinite", "stopped"]  # the handler saw the fault and the stop, then the run raised


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"spike_zscore": 0.0}, "spike_zscore"),
        ({"spike_zscore": -1.0}, "spike_zscore"),
        ({"spike_warmup": -1}, "spike_warmup"),
        ({"vanish_patience": 0}, "vanish_patience"),
        ({"vanish_threshold": -1e-9}, "vanish_threshold"),
        ({"alert_every": 0}, "alert_every"),
        ({"max_dumps": 0}, "max_dumps"),
        ({"alert_handlers": [print, 3]}, "alert_handlers"),
        ({"explode_threshold": -2.0}, "explode_threshold"),
    ],
)
def test_detection_arguments_are_validated(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        GradGuard(**kwargs)


def test_alerts_reach_tensorboard_as_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version="")
    guard = GradGuard(explode_threshold=1e-9, alert_every=2)
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=5, logger=logger).fit(FaultNet())
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("gradguard/alerts/text_summary")
    assert [t.step for t in texts] == [0, 2, 4]
    body = texts[1].tensor_proto.string_val[0].decode()
    assert "exploding" in body and "1 similar alert suppressed since step 0" in body


# ------------------------------------------------------------ loss scale
def test_loss_scale_collapse_under_fp16_on_cpu() -> None:
    class AlwaysOverflow(FaultNet):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return super().training_step(batch, batch_idx) * 1e30  # overflows fp16 every step

    guard = GradGuard(min_loss_scale=1.0, alert_every=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=20, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(AlwaysOverflow())
    collapse = [e for e in guard.events if e.kind == "loss_scale_collapse"]
    # 2**16 halves on every overflow: below 1.0 from the 18th step (scale 2**-1) on
    assert [e.step for e in collapse] == [17, 18, 19]
    assert collapse[0].value == 0.5
    assert guard.core.amp_overflow_steps == 20 and guard.skipped_steps == 0


# ------------------------------------------------------------------ dumps
class NanRecordNet(FaultNet):
    """A real data fault: record 21 (batch 2 of 8) holds a NaN; dropout makes RNG state matter."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.drop(x))

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        x[21, 2] = math.nan
        return DataLoader(TensorDataset(x, y), batch_size=8)


def test_dump_round_trips_and_replays_the_fault(tmp_path: Path) -> None:
    guard = GradGuard(dump_dir=str(tmp_path))
    model = NanRecordNet()
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=4).fit(model)
    (path,) = guard.dumps
    dump = load_dump(path)
    event = dump["event"]
    assert (event["kind"], event["step"], dump["global_step"], dump["batch_idx"], dump["epoch"]) == (
        "nonfinite",
        2,
        2,
        2,
        0,
    )
    x, _ = dump["batch"]
    assert torch.isnan(x[5, 2]) and x.shape == (8, 4)
    assert set(dump["rng"]) >= {"torch", "numpy", "python"}
    # the weights and optimizer state as they were before the step
    weights, opt_state = model.snapshots[2]
    for k, v in weights.items():
        assert torch.equal(dump["model"][k], v)
    assert torch.equal(dump["optimizer"]["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])

    # The "Reproducing a bad step from a dump" block of docs/why-did-it-break.md, run as it stands there.
    readme = (Path(__file__).resolve().parents[2] / "docs/why-did-it-break.md").read_text()
    section = readme[readme.index("## Reproducing a bad step from a dump") :]
    code = section[section.index("```python\n") + 10 : section.index("\n```", section.index("```python"))]
    code = code.replace('"dumps/gradguard-step000002-nonfinite.pt"', repr(path))
    scope: dict[str, Any] = {"MyModel": NanRecordNet}
    with pytest.warns(GradGuardWarning), contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "docs/why-did-it-break.md", "exec"), scope)
    report = scope["report"]
    assert report.event is not None
    assert report.event.origin == event["origin"] == "loss"
    assert list(report.event.layers) == list(event["layers"]) == ["l0", "l1", "l2"]
    assert out.getvalue() == "loss ('l0', 'l1', 'l2') loss\n"


class DropoutGradFault(FaultNet):
    """Dropout before every layer, and a NaN written into l1's gradient at step 2 (the loss stays
    finite): what the dump's RNG state restores is visible in the replayed loss."""

    def __init__(self) -> None:
        super().__init__({2: ("grad", 1, math.nan)})
        self.drop = nn.Dropout(0.5)
        self.losses: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.drop(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self._trainer is not None:
            self.losses[self.trainer.global_step] = loss.detach().clone()
        return loss


def test_a_dump_restores_the_rng_so_the_replayed_loss_equals_the_original_under_dropout(tmp_path: Path) -> None:
    guard = GradGuard(dump_dir=str(tmp_path), replay=False)
    model = DropoutGradFault()
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=4).fit(model)
    (path,) = guard.dumps
    dump = load_dump(path)
    original = model.losses[2]
    assert math.isfinite(float(original)) and dump["global_step"] == 2

    def replayed(restore: bool) -> Tensor:
        replay = DropoutGradFault()
        replay.load_state_dict(dump["model"])
        torch.manual_seed(1234)  # whatever state the replaying process is in
        if restore:
            restore_rng(dump["rng"])
        with torch.no_grad():  # outside a Trainer: no fault is planted, the forward is the step's
            x, y = dump["batch"]
            return nn.functional.mse_loss(replay(x), y)

    assert torch.equal(replayed(restore=True), original)  # the same dropout masks, bit for bit
    assert not torch.equal(replayed(restore=False), original)  # the RNG state is what made it equal


def test_max_dumps_and_one_dump_per_origin(tmp_path: Path) -> None:
    faults = {1: ("grad", 0, math.nan), 2: ("grad", 0, math.nan), 3: ("grad", 1, math.nan), 5: ("grad", 2, math.inf)}
    guard = GradGuard(dump_dir=str(tmp_path), max_dumps=2)
    with pytest.warns(GradGuardWarning):
        trainer([guard], steps=7).fit(FaultNet(faults))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gradguard-step000001-nonfinite.pt", "gradguard-step000003-nonfinite.pt"]
    assert not list(tmp_path.glob(".gradguard-*"))  # no temporary files left behind
    assert [load_dump(tmp_path / f)["event"]["origin"] for f in files] == ["l0", "l1"]


def test_load_dump_refuses_what_is_not_a_dump(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(GradGuardError, match="not a GradGuard dump"):
        load_dump(corrupt)
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(1)}, other)
    with pytest.raises(GradGuardError, match="not a GradGuard dump"):
        load_dump(other)
    with pytest.raises(GradGuardError, match="no dump"):
        load_dump(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path("/tmp/gradguard-evil-was-run"),))


def test_load_dump_never_executes_a_pickle(tmp_path: Path) -> None:
    marker = Path("/tmp/gradguard-evil-was-run")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lightning_gradguard.dump/1", "payload": Evil()}, evil)
    with pytest.raises(GradGuardError, match="refusing to unpickle"):
        load_dump(evil)
    assert not marker.exists()
    with evil.open("wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(GradGuardError):
        load_dump(evil)
    assert not marker.exists()
