"""A checkpoint written by lightning_gradguard 0.2.0 loads, and the resumed run decides as 0.2.0 did.

The fixtures in ``tests/data/`` were written by ``tests/data/make_checkpoint.py`` with version 0.2.0:
the Lightning checkpoint after step 24 of a 50-step run that uses every stateful part of the guard,
and everything the uninterrupted 0.2.0 run decided on steps 24..49 (per-step metrics, skips, events,
the final guard state and summary). Resuming with today's code must reproduce all of it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.data.make_checkpoint import CKPT, EXPECTED, RESUME_AT, STEPS, decisions, run


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_checkpoint_of_version_0_2_0_resumes_with_identical_decisions() -> None:
    expected = json.loads(EXPECTED.read_text())
    assert expected["written_by"] == "0.2.0"
    guard, recorder = run(STEPS, ckpt_in=CKPT)
    got = json.loads(json.dumps(decisions(guard, recorder, RESUME_AT)))  # the same JSON round trip
    assert sorted(got["steps"]) == sorted(expected["steps"]) == sorted(str(s) for s in range(RESUME_AT, STEPS))
    for step, row in expected["steps"].items():
        assert got["steps"][step] == row, step
    assert got["events"] == expected["events"]
    assert got["state"] == expected["state"]
    assert got["summary"] == expected["summary"]


def test_checkpoint_state_format_is_unchanged() -> None:
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("GradGuard")]
    expected = json.loads(EXPECTED.read_text())["state"]
    assert set(state) == set(expected)
    guard, _ = run(RESUME_AT, ckpt_in=None)  # a fresh run of the same length writes the same keys
    assert set(guard.state_dict()) == set(state)
    assert {k: type(v) for k, v in guard.state_dict().items()} == {k: type(v) for k, v in state.items()}
    assert Path(CKPT).stat().st_size < 64_000
