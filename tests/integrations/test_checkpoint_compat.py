"""A checkpoint written by lightning_gradguard 0.2.0 loads, and the resumed run decides as 0.2.0 did.

The fixtures in ``tests/data/`` were written by ``tests/data/make_checkpoint.py`` with version 0.2.0:
the Lightning checkpoint after step 24 of a 50-step run that uses every stateful part of the guard,
and everything the uninterrupted 0.2.0 run decided on steps 24..49 (per-step metrics, skips, events,
the final guard state and summary). Resuming with today's code must decide exactly the same: every
skip, event (its kind, step, origin, layers and action), clip decision and counter. The floats were
computed on the machine that recorded them, so they are compared within a relative tolerance
(``tests/recorded.py`` says why): another CPU's kernels move float32 results by an ulp or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.data.make_checkpoint import CKPT, EXPECTED, RESUME_AT, STEPS, decisions, run
from tests.recorded import assert_matches_recorded, numbers_of


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


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_checkpoint_of_version_0_2_0_resumes_with_identical_decisions() -> None:
    expected = json.loads(EXPECTED.read_text())
    assert expected["written_by"] == "0.2.0"
    guard, recorder = run(STEPS, ckpt_in=CKPT)
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
    events = _without_replay(got["events"])
    decided = ("kind", "step", "origin", "layers", "action", "optimizer_idx")
    assert [{k: e[k] for k in decided} for e in events] == [{k: e[k] for k in decided} for e in expected["events"]]
    assert_matches_recorded(events, expected["events"], "events")
    assert_matches_recorded(got["state"], expected["state"], "state")
    # The summary's wording changed in 0.3.0 (plurals); every count in it is a decision.
    assert numbers_of(got["summary"]) == numbers_of(expected["summary"])


def test_checkpoint_state_format_is_unchanged() -> None:
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("GradGuard")]
    expected = json.loads(EXPECTED.read_text())["state"]
    assert set(state) == set(expected)
    guard, _ = run(RESUME_AT, ckpt_in=None)  # a fresh run of the same length writes the same keys
    assert set(guard.state_dict()) == set(state)
    assert {k: type(v) for k, v in guard.state_dict().items()} == {k: type(v) for k, v in state.items()}
    assert Path(CKPT).stat().st_size < 64_000
