"""Checkpoints written by earlier versions load, and the resumed run decides as that version did.

Two fixtures in ``tests/data/``, each the Lightning checkpoint after step 24 of a 50-step run that uses
every stateful part of the guard of its day, beside everything the uninterrupted run decided on steps
24..49 (per-step metrics, skips, events, the final guard state and summary):

* ``make_checkpoint.py``, run with 0.2.0: ZClip, spike statistics, the exploding detector,
  per-layer watch, rate-limited alerts, NaN steps;
* ``make_checkpoint_0_3.py``, run with 0.3.0, the last format before the guard's state went by
  component: the same, plus two rollbacks (counters, skip list, learning-rate backoff), the device
  spike statistics and update tracking.

Resuming with today's code must decide exactly the same: every skip, event (its kind, step, origin,
layers and action), clip decision and counter. The floats were computed on the machine that
recorded them, so they are compared within a relative tolerance (``tests/recorded.py`` says why):
another CPU's kernels move float32 results by an ulp or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.data import make_checkpoint, make_checkpoint_0_3
from tests.data.make_checkpoint import RESUME_AT, STEPS, decisions
from tests.recorded import assert_matches_recorded, numbers_of

FIXTURES = {"0.2.0": make_checkpoint, "0.3.0": make_checkpoint_0_3}


def _without_replay(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events without the replay's verdict, which the guard now appends to the first fault of a run
    (its ``extra["replay"]`` and a sentence at the end of its message): an addition, not a decision."""
    out = []
    for event in events:
        extra = dict(event.get("extra", {}))
        replay = extra.pop("replay", None)
        message = event["message"].split(" Replay: ")[0] if replay is not None else event["message"]
        out.append({**event, "extra": extra, "message": message})
    return out


# Lightning resumes from an end-of-epoch checkpoint inside the epoch it was written in: the resumed run
# trains step 24 as batch 1 of epoch 23, where the uninterrupted run trained it as batch 0 of epoch 24,
# and numbers every later epoch one lower. The batches a rollback undid and the skip list's entries
# after the resume are therefore compared by their steps and reasons (what the guard decided), and
# their count; the positions of the entries the checkpoint carried are compared as they are.
def _positions_as_steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "extra": {k: v for k, v in e["extra"].items() if k != "batch_ranges"}} for e in events]


def _skips_as_steps(state: dict[str, Any]) -> dict[str, Any]:
    recovery = state.get("recovery")
    if recovery is None:
        return state
    skips = [e if e["step"] < RESUME_AT else {k: v for k, v in e.items() if k not in ("epoch", "batch_idx")}
             for e in recovery["skips"]]  # fmt: skip
    return {**state, "recovery": {**recovery, "skips": skips}}


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_a_checkpoint_of_an_earlier_version_resumes_with_identical_decisions(version: str) -> None:
    fixture = FIXTURES[version]
    expected = json.loads(fixture.EXPECTED.read_text())
    assert expected["written_by"] == version
    guard, recorder = fixture.run(STEPS, ckpt_in=fixture.CKPT)
    got = json.loads(json.dumps(decisions(guard, recorder, RESUME_AT)))  # the same JSON round trip
    assert sorted(got["steps"]) == sorted(expected["steps"]) == sorted(str(s) for s in range(RESUME_AT, STEPS))
    for step, row in expected["steps"].items():
        # the decisions exactly: skipped, non-finite, the event's kind, which metrics were logged
        assert {k: v for k, v in got["steps"][step].items() if k != "metrics"} == {
            k: v for k, v in row.items() if k != "metrics"
        }, step
        assert_matches_recorded(got["steps"][step]["metrics"], row["metrics"], f"steps[{step}].metrics")
        clipped = [got["steps"][step]["metrics"].get("gradguard/clip_coef", 1.0) < 1.0,
                   row["metrics"].get("gradguard/clip_coef", 1.0) < 1.0]  # fmt: skip
        assert clipped[0] == clipped[1], f"step {step}: whether the clip applied"
    replayed = [e for e in got["events"] if "replay" in e.get("extra", {})]
    assert [(e["step"], e["extra"]["replay"]["verdict"]) for e in replayed] == [(35, "data or numerics")]
    events, recorded = _without_replay(got["events"]), _without_replay(expected["events"])  # 0.3.0 replayed too
    events, recorded = _positions_as_steps(events), _positions_as_steps(recorded)
    got["state"], expected["state"] = _skips_as_steps(got["state"]), _skips_as_steps(expected["state"])
    decided = ("kind", "step", "origin", "layers", "action", "optimizer_idx")
    assert [{k: e[k] for k in decided} for e in events] == [{k: e[k] for k in decided} for e in recorded]
    assert_matches_recorded(events, recorded, "events")
    assert_matches_recorded(got["state"], expected["state"], "state")
    # The summary's wording changed in 0.3.0 (plurals); every count in it is a decision.
    assert numbers_of(got["summary"]) == numbers_of(expected["summary"])


def test_checkpoint_state_format_is_unchanged() -> None:
    fixture = make_checkpoint
    ckpt = torch.load(fixture.CKPT, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("GradGuard")]
    expected = json.loads(fixture.EXPECTED.read_text())["state"]
    assert set(state) == set(expected)
    guard, _ = fixture.run(RESUME_AT, ckpt_in=None)  # a fresh run of the same length writes the same keys
    assert set(guard.state_dict()) == set(state)
    assert {k: type(v) for k, v in guard.state_dict().items()} == {k: type(v) for k, v in state.items()}
    assert Path(fixture.CKPT).stat().st_size < 64_000
