"""Rollbacks and skipped steps in ``gradguard report``: the batches a rollback undid as ranges, from this
version's events and from the flat lists of [epoch, batch] pairs that the version before wrote, in
lines that stay short however many batches a rollback undid (issue 28)."""

from __future__ import annotations

from typing import Any

from lightning_gradguard.cli import render_text
from lightning_gradguard.health.judge import RunData, judge_run

CAUSE = "5 consecutive skipped steps (max_consecutive_skips=5)"
SPIKE = "a confirmed spike: 3 steps in a row above the rolling statistics by z > 6 (spike_patience=3)"


def _rollback(step: int, snapshot: int, cause: str = CAUSE, **extra: Any) -> dict[str, Any]:
    return {"kind": "rollback", "step": step, "origin": None, "layers": [], "value": float(snapshot),
            "message": f"GradGuard rolled back at step {step}", "action": "rolled back",
            "extra": {"cause": cause, "from_step": step, "snapshot_step": snapshot, **extra}}  # fmt: skip


def _skipped(step: int, kind: str = "nonfinite") -> dict[str, Any]:
    return {"kind": kind, "step": step, "origin": "loss", "layers": ["l0"], "value": None,
            "message": f"GradGuard skipped step {step}", "action": "skipped"}  # fmt: skip


def _judged(events: list[dict[str, Any]]) -> Any:
    norms = [(s, 1.0) for s in range(0, 1000, 10)]
    return judge_run("run", RunData(scalars={"gradguard/total_norm": norms}, events=events, recorded_events=True))


def test_rollbacks_are_reported_as_ranges_in_short_lines() -> None:
    # issue 28's word language model, as the version before wrote it: the rollback at step 20 to the
    # snapshot of step 0 listed 38 ids, batches 0:0-0:16 twice (an earlier rollback had undone them too)
    twice = [[0, b] for b in range(21)] + [[0, b] for b in range(17)]
    events = [
        *(_skipped(s) for s in range(5)),
        _rollback(20, 0, batches_skipped=twice),
        _skipped(30, "spike_skipped"),
        _rollback(900, 800, SPIKE, batch_ranges=[[0, 6400, 7199]], batch_count=800),  # every=100, accumulation 8
        _rollback(960, 900, batch_ranges=[[0, 9995, 9999], [1, 0, 10]], batch_count=16),  # across an epoch
        _rollback(990, 960, batch_ranges=[[1, 2 * k, 2 * k] for k in range(400)], batch_count=400),  # scattered
        _rollback(995, 990),  # a plain loop: no batch named
    ]
    rep = _judged(events)
    assert [(r["step"], r["batches"], r["batch_count"]) for r in rep.rollbacks] == [
        (20, [[0, 0, 20]], 21),
        (900, [[0, 6400, 7199]], 800),
        (960, [[0, 9995, 9999], [1, 0, 10]], 16),
        (990, [[1, 2 * k, 2 * k] for k in range(400)], 400),
        (995, [], 0),
    ]
    text = render_text(rep)
    lines = [line for line in text.splitlines() if "rollback at step" in line or "batches undone" in line]
    assert lines == [
        f"  rollback at step 20 to the snapshot of step 0: {CAUSE}",
        "    batches undone: 0:0–0:20 (21 batches)",
        f"  rollback at step 900 to the snapshot of step 800: {SPIKE}",
        "    batches undone: 0:6400–0:7199 (800 batches)",
        f"  rollback at step 960 to the snapshot of step 900: {CAUSE}",
        "    batches undone: 0:9995–0:9999, 1:0–1:10 (16 batches)",
        f"  rollback at step 990 to the snapshot of step 960: {CAUSE}",
        "    batches undone: 1:0, 1:2, 1:4 and 397 more ranges (400 batches)",
        f"  rollback at step 995 to the snapshot of step 990: {CAUSE}",
    ]
    assert max(len(line) for line in lines) < 160
    assert "  skipped steps: 0–4 (nonfinite); 30 (spike)" in text.splitlines()


def test_rollbacks_that_did_not_save_the_run_are_not_called_survived() -> None:
    """The word language model of issue 28: ten rollbacks to step 0, then 'the run did not recover'
    (its NaN carried hidden state outlives every rollback). The advice must not say it survived."""
    stop = {"kind": "stopped", "step": 34, "origin": None, "layers": [], "value": None, "action": "raised",
            "message": "GradGuard: the run did not recover: 3 non-finite losses in a row at step 34, after 10 "
                       "rollbacks (max_rollbacks=10).", "extra": {}}  # fmt: skip
    rollbacks = [_rollback(s, 0) for s in (4, 7, 10)]
    survived = {f["kind"]: f["advice"] for f in _judged(rollbacks).findings}["rollback"]
    stopped = {f["kind"]: f["advice"] for f in _judged([*rollbacks, stop]).findings}["rollback"]
    assert survived.startswith("the run survived a persistent fault;")
    assert stopped.startswith("the rollbacks did not save the run (it stopped after the last one)")
    assert "survived" not in stopped and "on_gradguard_rollback" in stopped
