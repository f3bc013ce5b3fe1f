"""Recovery in a plain PyTorch loop: snapshots restored bit for bit, the triggers, the depth of a
rollback, the learning-rate backoff, the device spike skip, and clear errors."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard import GuardCore, NonFiniteGradientError, RestoreError, Rollback
from lightning_gradguard.core.spike import SpikeStatistic
from lightning_gradguard.detectors.spike import HostSpikeStats
from tests.helpers import assert_same_state, poison, scale_grad
from tests.hostreads import host_reads

warnings.filterwarnings("ignore", message="GradGuard")


class Loop:
    """A model, an optimizer, a scheduler (and optionally a CPU GradScaler) driven by a GuardCore.

    ``faults`` maps a step to "nan" (a NaN gradient at the hidden layer), "loss" (a NaN loss) or a
    float (the hidden layer's gradient multiplied by it: a finite spike). ``pre`` keeps, per step,
    copies of everything taken *before* the guard sees that step: the reference for a snapshot.
    """

    def __init__(self, fused: bool = False, scaler: bool = False, sched: str = "lambda", **guard: Any) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, fused=fused)
        self.sched: Any = (
            torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.1 * s))
            if sched == "lambda"
            else torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.99)
        )
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if scaler else None
        self.guard = GuardCore(self.model, **guard)
        self.guard.prepare(self.model, [self.opt], schedulers=[self.sched], scaler=self.scaler)
        self.faults: dict[int, Any] = {}
        self.pre: dict[int, Any] = {}
        self.rng: dict[int, Tensor] = {}
        self.post: dict[int, Any] = {}
        self.reports: list[Any] = []
        self.data = torch.Generator().manual_seed(1)
        self.step_no = 0

    def state(self) -> Any:
        return (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.opt.state_dict()),
            copy.deepcopy(self.sched.state_dict()),
            copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
        )

    def weights_and_moments(self) -> Any:
        return self.state()[0], self.state()[1]["state"]

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.one()

    def one(self) -> Any:
        step, fault = self.step_no, self.faults.get(self.step_no)
        self.opt.zero_grad()
        x = torch.randn(16, 4, generator=self.data)
        h = torch.tanh(self.model[0](x))
        if fault == "nan":
            h = poison(h, math.nan)
        elif isinstance(fault, float):
            h = scale_grad(h, fault)
        loss = self.model[2](h).pow(2).mean()
        if fault == "loss":
            loss = loss * math.nan
        self.guard.observe_loss(loss)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        torch.rand(1)  # the global RNG moves on every step (as dropout would)
        self.pre[step] = self.state()
        self.rng[step] = torch.get_rng_state()
        report = self.guard.step(self.opt, step=step, scaler=self.scaler)
        self.post[step] = self.state()  # right after the guard: a rollback's result
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.reports.append(report)
        self.step_no += 1
        return report

    def rollbacks(self) -> list[tuple[int, int]]:
        return [(e.step, e.extra["snapshot_step"]) for e in self.guard.events if e.kind == "rollback"]


def test_a_manual_rollback_restores_everything_bit_for_bit_into_the_same_tensors() -> None:
    loop = Loop(scaler=True, rollback=Rollback(every=3, keep=2))
    held = loop.model[0].weight  # a reference the user holds
    loop.run(8)
    snap = loop.guard.recovery.ring.snapshots[-1]  # type: ignore[union-attr]
    assert snap.step == 6  # taken at steps 0, 3, 6 (the newest two kept)
    assert [s.step for s in loop.guard.recovery.ring.snapshots] == [3, 6]  # type: ignore[union-attr]
    moment = loop.opt.state[held]["exp_avg"]
    held_state = moment
    event = loop.guard.rollback()
    # the parameters, the optimizer's moments and step counts, the scheduler, the scaler: as before step 6
    assert_same_state(loop.state(), loop.pre[6])
    assert loop.model[0].weight is held and torch.equal(held, loop.pre[6][0]["0.weight"])
    assert loop.opt.state[held]["exp_avg"] is held_state  # restored into the same tensor
    assert loop.scaler is not None and loop.scaler.get_scale() == loop.pre[6][3]["scale"]
    assert torch.equal(torch.get_rng_state(), loop.rng[6])  # the RNG went back too
    assert (event.kind, event.step, event.extra["snapshot_step"], event.action) == ("rollback", 7, 6, "rolled back")
    assert event.extra["manual"] and loop.guard.rollbacks == 1
    loop.run(3)  # and training goes on from there
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())


def test_a_fault_at_step_2_rolls_back_to_the_start() -> None:
    loop = Loop(rollback=Rollback(every=100), max_consecutive_skips=1)
    loop.faults[2] = "nan"
    loop.run(2)
    start = loop.pre[0]
    loop.run(1)
    assert loop.rollbacks() == [(2, 0)]
    assert_same_state(loop.post[2], start)  # the weights and the (empty) optimizer state of step 0
    assert loop.opt.state_dict()["state"] == {}
    assert loop.reports[-1].rolled_back and loop.reports[-1].skipped


def test_a_recurring_fault_goes_to_an_older_snapshot_each_time() -> None:
    loop = Loop(rollback=Rollback(every=3, keep=3, max_rollbacks=5), max_consecutive_skips=2)
    for s in (10, 11, 13, 14):  # a fault, a rollback, the same fault again right after
        loop.faults[s] = "nan"
    loop.run(12)
    assert [s.step for s in loop.guard.recovery.ring.snapshots] == [3, 6, 9]  # type: ignore[union-attr]
    loop.run(8)
    # which snapshot each rollback used: the newest (9), then, recurring, the one before it (6)
    assert loop.rollbacks() == [(11, 9), (14, 6)]
    assert [e.extra["depth"] for e in loop.guard.events if e.kind == "rollback"] == [0, 1]
    # each rollback restored its snapshot's state exactly: the one before step 9, then before step 6
    first = next(i for i, e in enumerate(loop.guard.events) if e.kind == "rollback")
    assert loop.guard.events[first].extra["from_step"] == 11
    assert_same_state(loop.post[11], loop.pre[9])
    assert_same_state(loop.post[14], loop.pre[6])


def test_the_second_rollback_restores_the_older_snapshot_exactly() -> None:
    loop = Loop(rollback=Rollback(every=3, keep=3, max_rollbacks=5), max_consecutive_skips=2)
    for s in (10, 11, 13, 14):
        loop.faults[s] = "nan"
    loop.run(15)  # step 14: the recurrence
    assert loop.rollbacks()[-1] == (14, 6)
    assert_same_state(loop.post[14], loop.pre[6])


def test_max_rollbacks_raises_a_clear_error() -> None:
    loop = Loop(rollback=Rollback(every=2, max_rollbacks=2), max_consecutive_skips=1)
    for s in range(5, 40):
        loop.faults[s] = "nan"
    with pytest.raises(NonFiniteGradientError, match=r"did not recover.*after 2 rollbacks \(max_rollbacks=2\)"):
        loop.run(40)
    assert loop.guard.rollbacks == 2 and loop.guard.events[-1].kind == "stopped"


def test_a_streak_of_nonfinite_losses_rolls_back() -> None:
    loop = Loop(rollback=Rollback(every=4, nonfinite_losses=2, on_skips=False))
    loop.faults.update({9: "loss", 10: "loss"})
    loop.run(12)
    assert loop.rollbacks() == [(10, 8)]
    # a plain loop names no batch: one entry per step, with every reason it was skipped for
    assert loop.guard.skip_list == [
        {"epoch": None, "batch_idx": None, "step": 8, "reason": "rolled back", "steps": [8],
         "reasons": ["rolled back"]},
        {"epoch": None, "batch_idx": None, "step": 9, "reason": "nonfinite", "steps": [9],
         "reasons": ["nonfinite", "rolled back"]},
        {"epoch": None, "batch_idx": None, "step": 10, "reason": "nonfinite", "steps": [10],
         "reasons": ["nonfinite", "rolled back"]},
    ]  # fmt: skip


def test_a_confirmed_spike_rolls_back() -> None:
    loop = Loop(rollback=Rollback(every=5, spike_zscore=6.0, spike_patience=3), spike_warmup=5)
    for s in (12, 13, 14):  # a finite burst: x1000 gradients three steps in a row
        loop.faults[s] = 1000.0
    loop.run(16)
    assert loop.rollbacks() == [(14, 10)]
    assert "confirmed spike" in next(e for e in loop.guard.events if e.kind == "rollback").extra["cause"]


@pytest.mark.parametrize("sched", ["lambda", "step"])
def test_the_lr_backoff_survives_the_schedulers_next_step(sched: str) -> None:
    clean = Loop(sched=sched)
    clean.run(12)
    loop = Loop(sched=sched, rollback=Rollback(every=100, lr_backoff=0.5))
    loop.run(6)
    loop.guard.rollback()  # back to step 0, learning rates halved
    for _ in range(12):
        loop.one()
    expected = clean.opt.param_groups[0]["lr"] * 0.5
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_skip_batches_skips_the_next_batches_after_a_rollback() -> None:
    loop = Loop(rollback=Rollback(every=2, skip_batches=2), max_consecutive_skips=1)
    loop.faults[5] = "nan"
    loop.run(8)  # steps 6 and 7: skipped without a look
    assert [r.skipped for r in loop.reports[-3:]] == [True, True, True]
    assert_same_state(loop.post[7][0], loop.post[5][0])  # no update since the rollback at step 5
    assert [e["reason"] for e in loop.guard.skip_list if e["step"] in (6, 7)] == ["after rollback"] * 2


def test_snapshots_on_disk(tmp_path: Path) -> None:
    loop = Loop(rollback=Rollback(every=2, keep=2, directory=str(tmp_path)), max_consecutive_skips=1)
    loop.run(7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gradguard-snapshot-rank0-step4.pt",
        "gradguard-snapshot-rank0-step6.pt",
    ]
    loop.faults[7] = "nan"
    loop.one()
    assert loop.rollbacks() == [(7, 6)]
    assert_same_state(loop.post[7], loop.pre[6])


def test_a_snapshot_that_cannot_be_restored_raises_instead_of_training_on(tmp_path: Path) -> None:
    loop = Loop(rollback=Rollback(every=2, directory=str(tmp_path)), max_consecutive_skips=1)
    loop.run(3)
    for f in tmp_path.iterdir():
        f.unlink()
    loop.faults[3] = "nan"
    with pytest.raises(RestoreError, match="could not read the snapshot of step 2"):
        loop.one()


def test_a_rollback_before_any_snapshot_and_without_the_option_raise() -> None:
    model = nn.Linear(2, 1)
    guard = GuardCore(model, rollback=Rollback())
    with pytest.raises(RestoreError, match="no snapshot exists yet"):
        guard.rollback()
    with pytest.raises(RuntimeError, match="needs the `rollback` option"):
        GuardCore(model).rollback()


def test_a_changed_model_refuses_to_restore() -> None:
    loop = Loop(rollback=Rollback(every=2))
    loop.run(3)
    loop.model.add_module("extra", nn.Linear(1, 1))
    with pytest.raises(RestoreError, match="parameters and buffers changed"):
        loop.guard.rollback()


def test_on_rollback_is_called_with_the_event() -> None:
    seen: list[Any] = []
    loop = Loop(rollback=Rollback(every=2), max_consecutive_skips=1, on_rollback=seen.append)
    loop.faults[4] = "nan"
    loop.run(5)
    assert [(e.kind, e.step) for e in seen] == [("rollback", 4)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "`every` to be an int >= 1, but got 0"),
        ({"keep": 0}, "`keep` to be an int >= 1, but got 0"),
        ({"max_rollbacks": 0}, "`max_rollbacks` to be an int >= 1, but got 0"),
        ({"nonfinite_losses": 0}, "`nonfinite_losses` to be an int >= 1 or None, but got 0"),
        ({"spike_zscore": -1.0}, "`spike_zscore` to be a number > 0 or None, but got -1.0"),
        ({"spike_patience": 0}, "`spike_patience` to be an int >= 1, but got 0"),
        ({"skip_batches": -1}, "`skip_batches` to be an int >= 0, but got -1"),
        ({"lr_backoff": 1.5}, r"`lr_backoff` to be a number in \(0, 1\] or None, but got 1.5"),
        ({"lr_backoff": 0.0}, r"`lr_backoff` to be a number in \(0, 1\] or None, but got 0.0"),
        ({"recur_within": -2}, "`recur_within` to be an int >= 0 or None, but got -2"),
    ],
)
def test_bad_rollback_arguments_are_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rollback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"directory": 3}, TypeError, "`directory` to be a path or None, but got 3"),
        ({"on_skips": "yes"}, TypeError, "`on_skips` to be a bool, but got 'yes'"),
        ({"skip_file": 1.0}, TypeError, "`skip_file` to be True, False or a path, but got 1.0"),
    ],
)
def test_bad_rollback_types_are_refused_by_name(kwargs: dict[str, Any], exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        Rollback(**kwargs)


def test_bad_guard_arguments_for_recovery_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="`skip_spikes` to be a number > 0 or None, but got -3"):
        GuardCore(skip_spikes=-3)
    with pytest.raises(TypeError, match="`rollback` to be a Rollback such as Rollback"):
        GuardCore(rollback={"every": 10})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`on_rollback` to be a callable"):
        GuardCore(on_rollback="reset")  # type: ignore[arg-type]


# ------------------------------------------------------------------ the skip list
class Positioned(Loop):
    """A Loop that names its batches: two micro-batches a step (epoch 0, batches 2·step and 2·step + 1),
    as under gradient accumulation of 2."""

    def one(self) -> Any:
        for k in (0, 1):
            self.guard.note_batch(0, 2 * self.step_no + k)
        return super().one()


def _read_as_version_1(saved: dict[str, Any]) -> tuple[int, float, set[tuple[int, int]]]:
    """What the version that wrote version 1 read of a skip list (its ``Recovery.load_state_dict``,
    verbatim but for the names): the rollbacks, the learning-rate scale, the batches skipped again."""
    seen: set[tuple[Any, ...]] = set()
    skips = []
    for entry in saved.get("skips", []):
        key = (entry.get("epoch"), entry.get("batch_idx"), int(entry["step"]), str(entry["reason"]))
        if key not in seen:
            seen.add(key)
            skips.append({"epoch": key[0], "batch_idx": key[1], "step": key[2], "reason": key[3]})
    replay = {(int(e["epoch"]), int(e["batch_idx"])) for e in skips if e["epoch"] is not None}
    return int(saved.get("rollbacks", 0)), float(saved.get("lr_scale", 1.0)), replay


def test_a_deeper_rollback_over_batches_already_undone_lists_each_batch_once(tmp_path: Path) -> None:
    path = tmp_path / "skips.json"
    rollback = Rollback(every=3, keep=3, max_rollbacks=5, lr_backoff=0.5, skip_file=str(path))
    loop = Positioned(rollback=rollback, max_consecutive_skips=2)
    for s in (10, 11, 13, 14):
        loop.faults[s] = "nan"
    loop.run(16)
    assert loop.rollbacks() == [(11, 9), (14, 6)]  # the recurrence goes one snapshot older, over 9-11 again
    first, second = [e.extra for e in loop.guard.events if e.kind == "rollback"]
    assert (first["batch_ranges"], first["batch_count"]) == ([[0, 18, 23]], 6)  # steps 9-11, two batches each
    assert (second["batch_ranges"], second["batch_count"]) == ([[0, 12, 29]], 18)  # steps 6-14
    skips = loop.guard.skip_list
    assert [(e["epoch"], e["batch_idx"]) for e in skips] == [(0, b) for b in range(12, 30)]  # each batch once
    reasons = {e["batch_idx"]: (e["step"], e["steps"], e["reason"], e["reasons"]) for e in skips}
    assert reasons[12] == (6, [6], "rolled back", ["rolled back"])
    assert reasons[18] == (9, [9], "rolled back", ["rolled back"])  # undone by both rollbacks: listed once
    assert reasons[21] == (10, [10], "nonfinite", ["nonfinite", "rolled back"])  # skipped, then undone twice
    assert reasons[27] == (13, [13], "nonfinite", ["nonfinite", "rolled back"])
    saved = json.loads(path.read_text())
    assert saved["version"] == 2 and saved["skips"] == skips
    assert loop.guard.state_dict()["components"]["recovery"]["skips"] == skips
    # the version that wrote version 1 still reads the file: the same batches are skipped again
    assert _read_as_version_1(saved) == (2, 0.25, {(0, b) for b in range(12, 30)})
    resumed = GuardCore(nn.Linear(4, 1), rollback=Rollback(skip_file=str(path)))
    resumed.load_state_dict(loop.guard.state_dict())  # the checkpoint and the file: the same list, merged
    assert resumed.skip_list == skips and resumed.recovery is not None
    assert resumed.recovery.replay == {(0, b) for b in range(12, 30)}


def test_a_version_1_skip_list_is_read_and_merged_into_one_entry_per_batch(tmp_path: Path) -> None:
    v1 = [  # issue 28's shape: batch 0:0 as non-finite, and as rolled back by two rollbacks
        {"epoch": 0, "batch_idx": 0, "step": 0, "reason": "nonfinite"},
        {"epoch": 0, "batch_idx": 0, "step": 0, "reason": "rolled back"},
        {"epoch": 0, "batch_idx": 0, "step": 0, "reason": "rolled back"},
        {"epoch": 0, "batch_idx": 1, "step": 1, "reason": "rolled back"},
        {"epoch": None, "batch_idx": None, "step": 7, "reason": "spike"},
    ]
    path = tmp_path / "gradguard_skips.json"
    path.write_text(json.dumps({"version": 1, "rollbacks": 2, "lr_scale": 0.25, "skips": v1[2:]}))
    guard = GuardCore(nn.Linear(2, 1), rollback=Rollback(skip_file=str(path)))
    guard.load_state_dict({"recovery": {"rollbacks": 1, "lr_scale": 0.5, "skips": v1[:3], "skip_next": 0}})
    assert guard.recovery is not None
    assert guard.rollbacks == 2 and guard.recovery.lr_scale == 0.25  # the file is newer than the checkpoint
    assert guard.skip_list == [
        {"epoch": 0, "batch_idx": 0, "step": 0, "reason": "nonfinite", "steps": [0],
         "reasons": ["nonfinite", "rolled back"]},
        {"epoch": 0, "batch_idx": 1, "step": 1, "reason": "rolled back", "steps": [1], "reasons": ["rolled back"]},
        {"epoch": None, "batch_idx": None, "step": 7, "reason": "spike", "steps": [7], "reasons": ["spike"]},
    ]  # fmt: skip
    assert guard.recovery.replay == {(0, 0), (0, 1)}


# ------------------------------------------------------------------ the device spike skip
def test_the_device_statistic_equals_the_rule_on_host_floats() -> None:
    """One rule (detectors/spike.py), two number types: the guard's device statistic and the host
    replay of ``gradguard report`` give the same z-scores (float64 on both sides)."""
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 30.0, 1.05, 1.0]
    host, device = HostSpikeStats(warmup=4), SpikeStatistic(warmup=4)
    for n in norms:
        expected = host.score(math.log(n))
        z = float(device.score(torch.tensor(n), None)[0])
        device.feed(torch.tensor(n), None, take=torch.tensor(True))
        # the same float64 arithmetic; the device's input is a float32 norm (1.2 is not one): rel 1e-6
        assert (math.isnan(expected) and z == 0.0) or z == pytest.approx(expected, rel=1e-6)


def test_a_planted_spike_is_skipped_on_the_device_bit_identically_with_no_host_read() -> None:
    loop = Loop(fused=True, skip_spikes=6.0, spike_warmup=5, log_every_n_steps=10, clip=None)
    loop.faults[7] = 1000.0  # a finite x1e3 spike at a non-logging step
    loop.run(7)
    stats = loop.guard.spike.state.clone()
    before = loop.weights_and_moments()
    with host_reads() as calls:
        report = loop.one()
    assert calls == [] and report.deferred  # skipped on the device: found_inf, no read
    assert_same_state(loop.weights_and_moments(), before)  # weights, moments and step counts bit-identical
    after = loop.guard.spike.state
    assert torch.equal(after[:, :3], stats[:, :3])  # left out of the statistics (n, mean, m2)
    assert after[:, 3].tolist() == [1.0, 1.0]  # one flagged step in a row
    with host_reads() as calls:
        loop.run(1)  # a healthy non-logging step: no read either
    assert calls == []
    loop.run(2)  # step 9 logs: the skip settles
    (event,) = [e for e in loop.guard.events if e.kind == "spike_skipped"]
    assert (event.step, event.action) == (7, "skipped") and event.extra["zscore"] > 6.0
    assert loop.guard.spike_skipped_steps == 1 and loop.guard.skipped_steps == 1


def test_a_spike_is_skipped_on_the_host_without_a_fused_optimizer() -> None:
    loop = Loop(skip_spikes=6.0, spike_warmup=5, log_every_n_steps=None)
    loop.faults[7] = 1000.0
    loop.run(7)
    before = loop.weights_and_moments()
    report = loop.one()
    assert report.skipped and report.event is not None and report.event.kind == "spike_skipped"
    assert_same_state(loop.weights_and_moments(), before)


def test_the_spike_statistics_see_the_loss_too() -> None:
    stats = SpikeStatistic(warmup=3)
    for loss in (2.0, 2.1, 1.9):
        stats.feed(torch.tensor(1.0), torch.tensor(loss), take=torch.tensor(True))
    z = stats.score(torch.tensor(1.0), torch.tensor(50.0))
    assert float(z[0]) == 0.0 and float(z[1]) > 100


def test_a_lasting_new_level_restarts_the_statistics_instead_of_skipping_forever() -> None:
    loop = Loop(skip_spikes=6.0, spike_warmup=5, log_every_n_steps=None, max_consecutive_skips=25)
    for s in range(10, 60):  # the gradient norm x1000 from step 10 on, for good
        loop.faults[s] = 1000.0
    loop.run(60)  # no NonFiniteGradientError: 8 steps skipped, then a new warm-up at the new level
    assert [e.step for e in loop.guard.events if e.kind == "spike_skipped"] == list(range(10, 18))
    assert loop.guard.skipped_steps == 8
