"""The rules of recovery (core/recovery.py), each checked on its own: what `make mutate` showed no test held.

A resumed run gets back every counter of its checkpoint (rollbacks, the learning-rate scale, the batches
still to skip) even without a skip file, takes the newer of the checkpoint and the file, and reads a
checkpoint from a run without the option. The skip file goes beside the logs, starts empty for a fresh
run, and a broken one is ignored. The skip list is ordered by step and position. The learning-rate
backoff reaches every scheduler, and `on_skips=False` raises at `max_consecutive_skips`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import GuardCore, NonFiniteGradientError, RestoreError, Rollback
from lightning_gradguard.core import recovery as recovery_module
from lightning_gradguard.core.component import GuardComponent, StepContext
from lightning_gradguard.core.recovery import SKIP_FILE, Recovery, scale_lrs
from lightning_gradguard.events import GradEvent
from tests.core.test_rollback import Loop

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")


def _entry(epoch: int | None, batch_idx: int | None, steps: list[int], reasons: list[str]) -> dict[str, Any]:
    return {"epoch": epoch, "batch_idx": batch_idx, "step": steps[0], "reason": reasons[0], "steps": steps,
            "reasons": reasons}  # fmt: skip


def _recovery(skip_file: str | bool = False, **options: Any) -> Recovery:
    return Recovery(Rollback(skip_file=skip_file, **options), record=lambda e: e)


# ------------------------------------------------------------------ resuming
def test_a_checkpoint_alone_restores_the_rollbacks_the_lr_scale_and_the_batches_still_to_skip() -> None:
    loop = Loop(rollback=Rollback(every=2, skip_batches=3, lr_backoff=0.5, skip_file=False), max_consecutive_skips=1)
    loop.faults[3] = "nan"
    loop.run(5)  # a rollback at step 3; steps 4-6 skipped after it: one done, two to go
    state = loop.guard.state_dict()
    assert state["components"]["recovery"] == {
        "rollbacks": 1, "lr_scale": 0.5, "skips": loop.guard.skip_list, "skip_next": 2
    }  # fmt: skip
    resumed = Loop(rollback=Rollback(every=2, skip_batches=3, lr_backoff=0.5, skip_file=False),
                   max_consecutive_skips=1)  # fmt: skip
    resumed.guard.load_state_dict(state)
    assert resumed.guard.rollbacks == 1 and resumed.guard.skip_list == loop.guard.skip_list
    resumed.step_no = 5
    resumed.run(3)
    assert [r.skipped for r in resumed.reports] == [True, True, False]  # the two batches still to skip
    assert [e["reasons"] for e in resumed.guard.skip_list if e["step"] in (5, 6)] == [["after rollback"]] * 2
    resumed.faults[8] = "nan"
    resumed.one()  # the second rollback of the run: numbered so, and the learning rates backed off again
    (event,) = [e for e in resumed.guard.events if e.kind == "rollback"]
    assert (event.extra["rollbacks"], event.extra["lr_scale"]) == (2, 0.25)
    assert event.message.endswith("learning rates x0.25. Rollback 2 of at most 3.")


def test_a_checkpoint_without_recovery_state_resumes_with_none() -> None:
    state = GuardCore(nn.Linear(2, 1)).state_dict()  # a run without the option
    assert "recovery" not in state["components"]
    guard = GuardCore(nn.Linear(2, 1), rollback=Rollback(skip_file=False))
    guard.load_state_dict(state)
    assert guard.recovery is not None
    assert guard.recovery.state_dict() == {"rollbacks": 0, "lr_scale": 1.0, "skips": [], "skip_next": 0}
    assert guard.recovery.replay == set()


def test_a_checkpoint_of_0_3_0_gives_its_top_level_recovery_state_to_the_component() -> None:
    entry = _entry(0, 4, [10], ["nonfinite"])
    guard = GuardCore(nn.Linear(2, 1), rollback=Rollback(skip_file=False))
    guard.load_state_dict({"recovery": {"rollbacks": 2, "lr_scale": 0.5, "skips": [entry], "skip_next": 1}})
    assert guard.recovery is not None and guard.recovery.resumed
    assert guard.recovery.state_dict() == {"rollbacks": 2, "lr_scale": 0.5, "skips": [entry], "skip_next": 1}
    assert guard.recovery.replay == {(0, 4)}
    fresh = GuardCore(nn.Linear(2, 1), rollback=Rollback(skip_file=False))
    fresh.load_state_dict({"steps": 3})  # 0.3.0, a run without the option
    assert fresh.recovery is not None and not fresh.recovery.resumed


@pytest.mark.parametrize(("in_file", "in_checkpoint", "expected"), [
    ((2, 0.25), (1, 0.5), (2, 0.25)),  # the file is newer: a rollback after the checkpoint was saved
    ((1, 0.5), (2, 0.25), (2, 0.25)),  # the checkpoint is newer
    ((1, 0.5), None, (1, 0.5)),  # a checkpoint without recovery state: the file's
])  # fmt: skip
def test_the_newer_of_the_skip_file_and_the_checkpoint_wins(
    tmp_path: Path, in_file: tuple[int, float], in_checkpoint: tuple[int, float] | None, expected: tuple[int, float]
) -> None:
    path = tmp_path / SKIP_FILE
    path.write_text(json.dumps({"version": 2, "rollbacks": in_file[0], "lr_scale": in_file[1], "skips": []}))
    recovery = _recovery(str(path))
    saved = {} if in_checkpoint is None else {"rollbacks": in_checkpoint[0], "lr_scale": in_checkpoint[1]}
    recovery.load_state_dict(saved)
    assert (recovery.rollbacks, recovery.lr_scale) == expected


@pytest.mark.parametrize("content", ["[1, 2]", "null", "{not json", ""])
def test_a_broken_skip_file_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / SKIP_FILE
    path.write_text(content)
    recovery = _recovery(str(path))
    recovery.load_state_dict({"rollbacks": 1, "lr_scale": 0.5, "skips": [_entry(0, 4, [2], ["nonfinite"])]})
    assert (recovery.rollbacks, recovery.lr_scale) == (1, 0.5)
    assert recovery.skips == [_entry(0, 4, [2], ["nonfinite"])] and recovery.replay == {(0, 4)}


def test_a_batch_seen_at_several_steps_keeps_them_all_when_resumed() -> None:
    entry = _entry(0, 1, [3, 9], ["nonfinite", "skip list"])
    recovery = _recovery()
    recovery.load_state_dict({"skips": [entry]})
    assert recovery.skips == [entry]


def test_the_skip_list_is_ordered_by_step_then_position_a_batch_without_one_first() -> None:
    recovery = _recovery()
    entries = [
        _entry(1, 0, [5], ["rolled back"]),
        _entry(0, 9, [5], ["rolled back"]),
        _entry(0, 3, [5], ["rolled back"]),
        _entry(None, None, [5], ["rolled back"]),
        _entry(0, 1, [4], ["nonfinite"]),
    ]
    recovery.load_state_dict({"skips": entries})
    order = [(e["step"], e["epoch"], e["batch_idx"]) for e in recovery.skips]
    assert order == [(4, 0, 1), (5, None, None), (5, 0, 3), (5, 0, 9), (5, 1, 0)]


# ------------------------------------------------------------------ the skip file
def test_the_skip_file_goes_beside_the_logs_only_when_asked(tmp_path: Path) -> None:
    beside = _recovery(True)
    assert beside.skip_path is None  # a plain loop: no file
    beside.set_log_dir(str(tmp_path / "root"))
    assert beside.skip_path == str(tmp_path / "root" / SKIP_FILE)
    nowhere = _recovery(False)
    nowhere.set_log_dir(str(tmp_path))
    assert nowhere.skip_path is None
    chosen = _recovery(str(tmp_path / "mine.json"))
    chosen.set_log_dir(str(tmp_path / "root"))
    assert chosen.skip_path == str(tmp_path / "mine.json")


def _stale(path: Path) -> str:
    text = json.dumps({"version": 2, "rollbacks": 3, "lr_scale": 0.125, "skips": [_entry(0, 2, [7], ["spike"])]})
    path.write_text(text)
    return text


def test_a_fresh_run_starts_the_skip_file_empty(tmp_path: Path) -> None:
    recovery = _recovery(True)
    recovery.set_log_dir(str(tmp_path))
    _stale(tmp_path / SKIP_FILE)  # an earlier run's list, not this one's
    recovery.begin_run()
    assert json.loads((tmp_path / SKIP_FILE).read_text()) == {"version": 2, "rollbacks": 0, "lr_scale": 1.0,
                                                              "skips": []}  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [SKIP_FILE]  # no temporary file left


def test_a_resumed_run_keeps_its_skip_file_and_no_file_is_made_where_none_was(tmp_path: Path) -> None:
    recovery = _recovery(True)
    recovery.set_log_dir(str(tmp_path))
    text = _stale(tmp_path / SKIP_FILE)
    recovery.load_state_dict({})
    recovery.begin_run()
    assert (tmp_path / SKIP_FILE).read_text() == text
    fresh = _recovery(True)
    fresh.set_log_dir(str(tmp_path / "other"))
    fresh.begin_run()
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ triggers
def test_on_skips_false_raises_at_max_consecutive_skips_instead_of_rolling_back() -> None:
    loop = Loop(rollback=Rollback(every=2, on_skips=False), max_consecutive_skips=2)
    loop.faults.update({3: "nan", 4: "nan"})
    loop.run(4)
    with pytest.raises(NonFiniteGradientError, match=r"2 consecutive optimizer steps were skipped"):
        loop.one()
    assert loop.guard.rollbacks == 0


def test_on_skips_rolls_back_at_max_consecutive_skips() -> None:
    recovery = _recovery(on_skips=True)
    assert recovery.on_skip_limit("3 consecutive skipped steps") is True
    assert recovery.cause == "3 consecutive skipped steps"
    recovery.request("a later cause")  # the first trigger of a step is the one acted on
    assert recovery.cause == "3 consecutive skipped steps"
    assert _recovery(on_skips=False).on_skip_limit("3 consecutive skipped steps") is False


# ------------------------------------------------------------------ the learning-rate backoff
def test_the_backoff_reaches_the_last_lr_and_schedulers_without_base_lrs() -> None:
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # no base_lrs
    assert not hasattr(plateau, "base_lrs")
    scale_lrs([opt], [lam, plateau], 0.5)
    assert opt.param_groups[0]["lr"] == 0.25
    assert lam.base_lrs == [0.25] and lam.get_last_lr() == [0.25] and plateau.get_last_lr() == [0.25]


def test_a_rollback_event_says_what_happened() -> None:
    events: list[GradEvent] = []
    loop = Loop(rollback=Rollback(every=2, skip_batches=1, lr_backoff=0.5), max_consecutive_skips=2,
                on_rollback=events.append)  # fmt: skip
    loop.faults.update({4: "nan", 5: "nan"})
    loop.run(6)
    (event,) = events  # at step 5, to the snapshot of step 2 (step 4 was due one, but was no healthy step)
    assert event.message == (
        "GradGuard rolled back at step 5 to the snapshot of step 2 (2 consecutive skipped steps "
        "(max_consecutive_skips=2)); the updates of steps 2-5 undone, the data goes on forward, the next 1 batch "
        "skipped, learning rates x0.5. Rollback 1 of at most 3."
    )
    assert event.extra == {
        "cause": "2 consecutive skipped steps (max_consecutive_skips=2)", "from_step": 5, "snapshot_step": 2,
        "batch_ranges": [], "batch_count": 0, "skip_next": 1, "rollbacks": 1, "depth": 0, "lr_scale": 0.5,
        "manual": False,
    }  # fmt: skip
    assert (event.kind, event.step, event.value, event.action) == ("rollback", 5, 2.0, "rolled back")


# ------------------------------------------------------------------ Recovery's own rules, step by step
def _armed(**options: Any) -> tuple[Recovery, torch.optim.Optimizer, list[GradEvent]]:
    """A Recovery over a one-layer model and its SGD (lr 1.0), recording its events."""
    events: list[GradEvent] = []
    recovery = Recovery(Rollback(**{"skip_file": False, **options}), record=lambda e: events.append(e) or e)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    recovery.targets.model, recovery.targets.optimizers = model, [opt]
    return recovery, opt, events


def _used(events: list[GradEvent]) -> list[tuple[int, int, int]]:
    return [(e.step, e.extra["snapshot_step"], e.extra["depth"]) for e in events if e.kind == "rollback"]


def test_a_fresh_recovery_is_due_calm_and_keeps_snapshots_in_memory(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    recovery, _, _ = _armed()
    assert recovery.due(0) and not recovery.suspicious and recovery.cause is None
    recovery.first(0)
    (snap,) = recovery.ring.snapshots
    assert (snap.step, snap.path) == (0, None) and list(tmp_path.iterdir()) == []
    recovery.first(1)  # the first snapshot only
    assert [s.step for s in recovery.ring.snapshots] == [0] and not recovery.due(1)
    no_model = _recovery()
    no_model.first(0)
    assert no_model.ring.snapshots == []


def test_snapshot_files_are_named_by_the_rank(tmp_path: Path) -> None:
    recovery = Recovery(Rollback(directory=str(tmp_path), skip_file=False), record=lambda e: e, rank=2)
    recovery.targets.model = nn.Linear(2, 1)
    recovery.capture(4)
    assert [p.name for p in tmp_path.iterdir()] == ["gradguard-snapshot-rank2-step4.pt"]


def test_rank_zero_alone_writes_the_skip_file(tmp_path: Path) -> None:
    for rank, name in ((None, "default.json"), (0, "zero.json"), (1, "one.json")):
        path = tmp_path / name
        ranked = {} if rank is None else {"rank": rank}
        recovery = Recovery(Rollback(skip_file=str(path)), record=lambda e: e, **ranked)
        recovery.observe_step(3, False, False, "nonfinite")
        assert path.is_file() == (rank != 1), rank
    assert json.loads((tmp_path / "default.json").read_text())["skips"] == [_entry(None, None, [3], ["nonfinite"])]


@pytest.mark.parametrize(("options", "flags", "cause"), [
    ({"nonfinite_losses": 2}, [(True, False), (True, False)], "2 non-finite losses in a row (nonfinite_losses=2)"),
    ({"spike_zscore": 6.0, "spike_patience": 2}, [(False, True), (False, True)],
     "a confirmed spike: 2 steps in a row above the rolling statistics by z > 6 (spike_patience=2)"),
    ({"spike_zscore": 4.5, "spike_patience": 1}, [(False, True)],
     "a confirmed spike: 1 step in a row above the rolling statistics by z > 4.5 (spike_patience=1)"),
])  # fmt: skip
def test_a_streak_requests_a_rollback_on_its_last_step_only(
    options: dict[str, Any], flags: list[tuple[bool, bool]], cause: str
) -> None:
    recovery = _recovery(**options)
    for step, (loss_bad, spike_high) in enumerate(flags):
        assert recovery.cause is None
        recovery.observe_step(step, loss_bad, spike_high, None)
        assert recovery.suspicious
    assert recovery.cause == cause


def test_after_a_rollback_the_streaks_start_again() -> None:
    recovery, _, events = _armed(nonfinite_losses=2, spike_zscore=6.0, spike_patience=2)
    recovery.capture(0)
    recovery.observe_step(1, True, False, "nonfinite")
    recovery.observe_step(2, True, False, "nonfinite")
    recovery.rollback(2, str(recovery.cause))
    assert recovery.cause is None and not recovery.suspicious
    recovery.observe_step(3, True, True, "nonfinite")  # one more of each: a new streak of one
    assert recovery.cause is None and len(events) == 1


def test_the_batches_after_a_rollback_and_those_of_the_resumed_list_are_skipped_with_their_reason() -> None:
    recovery, _, _ = _armed(skip_batches=2)
    recovery.load_state_dict({"skips": [_entry(0, 4, [10], ["nonfinite"])]})  # from a run that went further
    recovery.note_batch(0, 3)
    assert recovery.begin(7) is None
    recovery.note_batch(0, 4)
    assert recovery.begin(8) == "skip list"  # seen again at step 8, before the step that listed it
    entry = next(e for e in recovery.skips if e["batch_idx"] == 4)
    assert entry == _entry(0, 4, [8, 10], ["nonfinite", "skip list"])
    recovery.capture(8)
    recovery.rollback(9, "by hand", manual=True)
    assert [recovery.begin(s) for s in (10, 11, 12)] == ["after rollback", "after rollback", None]


def test_a_snapshot_is_placed_at_the_batch_of_its_step() -> None:
    recovery, _, _ = _armed()
    recovery.note_batch(2, 5)
    recovery.note_batch(2, 6)
    recovery.begin(0)
    recovery.first(0)
    assert recovery.ring.snapshots[0].position == (2, 5)


def test_no_rollback_before_a_snapshot_and_none_beyond_max_rollbacks() -> None:
    recovery, _, events = _armed(max_rollbacks=1)
    with pytest.raises(RestoreError) as info:
        recovery.rollback(3, "a cause")
    assert str(info.value) == (
        "GradGuard cannot roll back at step 3 (a cause): no snapshot exists yet (the first is taken at the first "
        "optimizer step)."
    )
    recovery.capture(0)
    recovery.rollback(3, "a cause")
    with pytest.raises(NonFiniteGradientError) as error:
        recovery.rollback(5, "another cause")
    stop = events[-1]
    assert error.value.event is stop and str(error.value) == stop.message == (
        "GradGuard: the run did not recover: another cause at step 5, after 1 rollback (max_rollbacks=1)."
    )
    assert (stop.kind, stop.step, stop.action, stop.extra) == (
        "stopped", 5, "raised", {"cause": "max_rollbacks=1 reached: another cause"}
    )


def test_a_manual_rollback_says_nothing_of_skipped_batches_or_learning_rates() -> None:
    recovery, _, events = _armed()
    recovery.capture(4)
    event = recovery.rollback(5, "requested by hand", manual=True)
    assert events == [event] and event.message == (
        "GradGuard rolled back at step 5 to the snapshot of step 4 (requested by hand); the updates of steps 4-5 "
        "undone, the data goes on forward. Rollback 1 of at most 3."
    )
    seen: list[GradEvent] = []
    recovery.on_rollback = seen.append
    recovery.rollback(6, "again", manual=True)
    assert seen == [events[-1]]


def test_a_trigger_within_recur_within_steps_is_a_recurrence() -> None:
    recovery, _, events = _armed(every=2, keep=3, max_rollbacks=5, recur_within=5)
    for step in (0, 2, 4):
        recovery.capture(step)
    recovery.rollback(5, "a")
    recovery.rollback(9, "b")  # 4 steps later: within 5, though more than `every`
    assert _used(events) == [(5, 4, 0), (9, 2, 1)]
    quick, _, quick_events = _armed(every=2, keep=3, recur_within=0)
    for step in (0, 2, 4):
        quick.capture(step)
    quick.rollback(5, "a")
    quick.rollback(6, "b")  # one step later: no recurrence with recur_within=0
    assert _used(quick_events) == [(5, 4, 0), (6, 4, 0)]


def test_triggers_far_apart_each_use_the_newest_snapshot() -> None:
    recovery, _, events = _armed(every=2, keep=3, max_rollbacks=5)
    for step in (0, 2, 4):
        recovery.capture(step)
    recovery.rollback(5, "a")
    recovery.capture(8)
    recovery.rollback(9, "b")  # 4 steps later: more than `every`, no recurrence
    assert _used(events) == [(5, 4, 0), (9, 8, 0)]


def test_a_recurrence_goes_one_older_each_time_and_stays_at_the_oldest() -> None:
    recovery, _, events = _armed(every=2, keep=3, max_rollbacks=5)
    for step in (0, 2, 4):
        recovery.capture(step)
    for step in (5, 6, 7, 8):
        recovery.rollback(step, "again")
    assert _used(events) == [(5, 4, 0), (6, 2, 1), (7, 0, 1), (8, 0, 0)]


def test_a_recurrence_after_its_snapshot_left_the_ring_uses_the_newest() -> None:
    recovery, _, events = _armed(every=2, keep=2, recur_within=100)
    for step in (0, 2):
        recovery.capture(step)
    recovery.rollback(3, "a")
    for step in (4, 6):  # the snapshot of step 2 falls out of the ring
        recovery.capture(step)
    recovery.rollback(7, "b")
    assert _used(events) == [(3, 2, 0), (7, 6, 0)]


def test_the_learning_rate_backoff_compounds_over_snapshots_taken_after_a_rollback() -> None:
    recovery, opt, events = _armed(every=2, lr_backoff=0.5)
    recovery.capture(0)
    recovery.rollback(1, "a")
    assert opt.param_groups[0]["lr"] == 0.5
    recovery.capture(3)  # a snapshot at the backed-off rate
    recovery.rollback(10, "b")
    assert opt.param_groups[0]["lr"] == 0.25 and recovery.lr_scale == 0.25
    assert [e.extra["lr_scale"] for e in events] == [0.5, 0.25]


def test_a_fault_at_the_first_step_rolls_back_to_the_state_before_it() -> None:
    loop = Loop(rollback=Rollback(every=100, skip_file=False), max_consecutive_skips=1)
    loop.faults[0] = "nan"
    loop.run(2)
    assert loop.rollbacks() == [(0, 0)]


# ------------------------------------------------------------------ as the guard's component
def test_a_rollback_without_the_model_says_where_to_pass_it() -> None:
    guard = GuardCore(rollback=Rollback(skip_file=False))
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError) as info:
        guard.step(opt)
    assert str(info.value) == (
        "GuardCore(rollback=...) needs the model: pass it to GuardCore(model, ...) or to prepare()."
    )


def test_an_optimizer_first_seen_at_a_step_is_in_every_snapshot_from_then_on() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    guard = GuardCore(model, rollback=Rollback(every=1, keep=3, skip_file=False))  # no prepare(): no optimizer
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[1].parameters(), lr=0.1)
    recovery = guard.recovery
    for step, opt in enumerate((first, first, second)):
        model(torch.ones(1, 2)).sum().backward()
        guard.step(opt, step=step)
    # the second optimizer clears the ring: its snapshots before step 2 do not hold it
    assert list(recovery.targets.optimizers) == [first, second]
    assert [(s.step, len(s.optim)) for s in recovery.ring.snapshots] == [(2, 2)]


class _Enriched(GuardComponent):
    """Marks every event that the guard lets a component enrich (during a step: ctx is not None)."""

    name = "enriched"

    def enrich(self, ctx: StepContext | None, event: GradEvent) -> GradEvent:
        return replace(event, extra={**event.extra, "in_step": ctx is not None})


def test_a_rollback_at_a_step_is_recorded_through_the_step_so_that_components_enrich_it() -> None:
    loop = Loop(rollback=Rollback(every=2, skip_file=False), max_consecutive_skips=1, components=[_Enriched()])
    loop.faults[3] = "nan"
    loop.run(4)
    (event,) = [e for e in loop.guard.events if e.kind == "rollback"]
    assert event.extra["in_step"] is True and loop.reports[3].event == event and loop.reports[3].rolled_back


def test_the_skip_file_goes_to_the_log_dir_given_to_prepare(tmp_path: Path) -> None:
    loop = Loop(rollback=Rollback(every=2), max_consecutive_skips=1)
    loop.guard.prepare(loop.model, [loop.opt], schedulers=[loop.sched], log_dir=str(tmp_path))
    loop.faults[3] = "nan"
    loop.run(4)
    assert json.loads((tmp_path / SKIP_FILE).read_text())["skips"] == loop.guard.skip_list != []


def test_the_skip_file_makes_its_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "skips.json"
    recovery = _recovery(str(path))
    recovery.observe_step(3, False, False, "nonfinite")
    assert json.loads(path.read_text())["skips"] == [_entry(None, None, [3], ["nonfinite"])]


def _snapshot_steps(loop: Loop) -> list[int]:
    return [s.step for s in loop.guard.recovery.ring.snapshots]


def test_no_snapshot_is_taken_of_a_step_skipped_on_a_flag() -> None:
    loop = Loop(skip_spikes=6.0, spike_warmup=5, rollback=Rollback(every=1, keep=20, skip_file=False))
    loop.faults[8] = 1000.0
    loop.run(10)
    assert loop.reports[8].skipped and not loop.guard.recovery.suspicious
    assert _snapshot_steps(loop) == [0, 1, 2, 3, 4, 5, 6, 7, 9]


def test_no_snapshot_is_taken_of_a_non_finite_step_that_is_not_skipped() -> None:
    loop = Loop(on_nonfinite="warn", log_every_n_steps=1, rollback=Rollback(every=1, keep=20, skip_file=False))
    loop.faults[3] = "nan"
    loop.run(5)  # warn: the NaN gradient is applied, and every later step is non-finite too
    assert [(r.skipped, r.nonfinite) for r in loop.reports] == [(False, False)] * 3 + [(False, True)] * 2
    assert _snapshot_steps(loop) == [0, 1, 2]


def test_no_snapshot_is_taken_of_a_step_settled_after_it_was_deferred() -> None:
    loop = Loop(on_nonfinite="warn", log_every_n_steps=4, rollback=Rollback(every=1, keep=20, skip_file=False))
    loop.run(8)
    assert [r.deferred for r in loop.reports] == [True, True, True, False] * 2
    assert _snapshot_steps(loop) == [0, 3, 7]  # the first (before any step), then the steps read at once


def test_the_positions_of_the_last_steps_only_are_kept(monkeypatch: Any) -> None:
    monkeypatch.setattr(recovery_module, "_POSITIONS_KEPT", 3)
    recovery = _recovery()
    for step in range(5):
        recovery.note_batch(0, step)
        recovery.begin(step)
        assert len(recovery._positions) == min(step + 1, 3)
    assert list(recovery._positions) == [2, 3, 4]


def test_a_rollback_names_the_batches_it_will_skip_in_the_plural() -> None:
    recovery, _, _ = _armed(skip_batches=2)
    recovery.capture(0)
    event = recovery.rollback(1, "by hand")
    assert ", the next 2 batches skipped." in event.message


def test_a_checkpoint_gives_its_counters_when_no_skip_file_says_otherwise(tmp_path: Path) -> None:
    recovery = _recovery()
    recovery.load_state_dict({})
    assert recovery.state_dict() == {"rollbacks": 0, "lr_scale": 1.0, "skips": [], "skip_next": 0}
    recovery.load_state_dict({"lr_scale": 0.5})  # no rollbacks recorded, no file: still the checkpoint's
    assert (recovery.rollbacks, recovery.lr_scale) == (0, 0.5)
    path = tmp_path / SKIP_FILE
    path.write_text(json.dumps({"version": 2, "rollbacks": 1, "lr_scale": 0.5, "skips": []}))
    tied = _recovery(str(path))
    tied.load_state_dict({"rollbacks": 1, "lr_scale": 0.25})  # as many rollbacks in both: the checkpoint's
    assert (tied.rollbacks, tied.lr_scale) == (1, 0.25)


def test_a_learning_rate_backoff_leaves_values_that_are_not_numbers_alone() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    sched = SimpleNamespace(base_lrs=[0.5, None], _last_lr=["n/a", 0.25])  # a scheduler's lists, odd entries kept
    scale_lrs([opt], [sched], 0.5)
    assert (sched.base_lrs, sched._last_lr, opt.param_groups[0]["lr"]) == ([0.25, None], ["n/a", 0.125], 0.5)


def test_a_checkpoint_is_vetoed_while_a_rollback_is_pending_or_a_streak_runs() -> None:
    recovery = _recovery(nonfinite_losses=3, spike_zscore=6.0, spike_patience=3)
    assert recovery.checkpoint_veto() is None
    recovery.observe_step(0, True, False, None)
    assert recovery.checkpoint_veto() == "the last loss was non-finite"
    recovery.observe_step(1, True, False, None)
    assert recovery.checkpoint_veto() == "the last 2 losses were non-finite"
    recovery.observe_step(2, False, True, None)
    assert recovery.checkpoint_veto() == "a spike in progress (1 step above the rolling statistics)"
    recovery.observe_step(3, False, True, None)
    assert recovery.checkpoint_veto() == "a spike in progress (2 steps above the rolling statistics)"
    recovery.observe_step(4, False, False, None)
    assert recovery.checkpoint_veto() is None
    recovery.request("by hand")
    assert recovery.checkpoint_veto() == "a rollback is pending (by hand)"


def test_the_rank_is_the_process_groups_once_there_is_one(monkeypatch: Any) -> None:
    import torch.distributed as dist

    assert recovery_module.rank() == 0  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    assert recovery_module.rank() == 3
