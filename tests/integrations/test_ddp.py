"""DDP with 2 CPU processes (gloo): a fault on one rank leads every rank to the same decision.

Two kinds of fault. A NaN in one rank's gradients is copied to every rank by DDP's all-reduce, so the
ranks would agree even without the guard's flag reduction. A fault in one rank's *loss* alone (a finite
spike under ``skip_spikes``, a NaN loss whose gradients are finite, a spike that confirms a rollback)
leaves the averaged gradients the same on both ranks: only the guard's one collective over its flags
keeps the ranks in step. The ``skip`` run (tests/ddp_run.py) has both, and records the norms the guard
reported beside ``torch.nn.utils`` on the averaged gradients, and every rank's weights and optimizer
state before and after every step, compared bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import assert_same_state

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Rendezvous failures are the environment's, not the guard's: a port taken between being found free
# and being bound. Only those are retried, once, with a new port.
RENDEZVOUS_ERRORS = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "Connection refused")


def run_ddp(tmp_path: Path, policy: str, prefix: str = "rank", check: bool = True) -> list[dict[str, object]]:
    for attempt in range(2):
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), policy],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=SCRIPT.parents[1],
        )
        if check and attempt == 0 and proc.returncode != 0 and any(e in proc.stderr for e in RENDEZVOUS_ERRORS):
            continue
        break
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    files = [tmp_path / f"{prefix}{r}.json" for r in (0, 1)]
    assert all(f.exists() for f in files), proc.stderr[-6000:]
    return [json.loads(f.read_text()) for f in files]


def states(tmp_path: Path) -> list[dict[str, dict[int, Any]]]:
    """Each rank's weights and optimizer state before and after every step (tests/ddp_run.py)."""
    return [torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1)]


def same(a: Any, b: Any) -> bool:
    """Equal to the bit, NaN included (``repr`` of a float round-trips)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def assert_ranks_bit_identical(s0: dict[str, dict[int, Any]], s1: dict[str, dict[int, Any]]) -> None:
    """Every parameter and every optimizer state tensor, before and after every step: ``torch.equal``."""
    assert sorted(s0["before"]) == sorted(s1["before"]) and sorted(s0["after"]) == sorted(s1["after"])
    for when in ("before", "after"):
        for step in s0[when]:
            assert_same_state(s0[when][step], s1[when][step])


def assert_unchanged(s: dict[str, dict[int, Any]], step: int) -> None:
    """The weights and the optimizer state after ``step`` are those before it, to the bit."""
    assert_same_state(s["before"][step], s["after"][step])


# rank 1: a NaN loss at step 2; rank 0: a NaN gradient at l1 at step 4 (tests/ddp_run.py)
SKIPPED_EVENTS = [
    ["nonfinite", 2, "loss", ["l0", "l1", "l2"], "skipped"],
    ["nonfinite", 4, "l1", ["l0", "l1"], "skipped"],
]
# and under "skip", on rank 1 only: a loss raised by 1e6 at step 6, a NaN loss with finite gradients at
# step 7, a loss raised by 1e6 at steps 9 and 10 (spike_patience=2: a rollback at step 10)
LOCAL_EVENTS = [
    *SKIPPED_EVENTS,
    ["spike_skipped", 6, None, [], "skipped"],
    ["nonfinite", 7, "loss", [], "skipped"],
    ["spike_skipped", 9, None, [], "skipped"],
    ["spike_skipped", 10, None, [], "skipped"],
    ["rollback", 10, None, [], "rolled back"],
]
HEALTHY, SKIPPED = [0, 1, 3, 5, 8, 11], [2, 4, 6, 7, 9]  # and step 10: rolled back to the snapshot of step 8
SPIKE_Z = 1000.0  # skip_spikes and Rollback(spike_zscore=) in tests/ddp_run.py


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], list[dict[str, dict[int, Any]]]]:
    """One launch for every test of the ``skip`` run (each launch costs seconds)."""
    out = tmp_path_factory.mktemp("ddp_skip")
    return run_ddp(out, "skip"), states(out)  # type: ignore[return-value]


def test_fault_on_one_rank_skips_on_both(skip_run: Any) -> None:
    (r0, r1), _ = skip_run
    assert r0["events"] == r1["events"] == LOCAL_EVENTS
    assert r0["skipped"] == r1["skipped"] == 6  # 5 skipped steps and the rolled-back one
    assert r0["nonfinite"] == r1["nonfinite"] == 3
    assert r0["global_step"] == r1["global_step"] == 12
    assert r0["finite"] and r1["finite"]


def test_norms_equal_torch_on_the_averaged_gradients_on_both_ranks(skip_run: Any) -> None:
    # Reference: clip_grad_norm_ (total) and vector_norm (per layer) of the gradients the guard saw,
    # computed by a callback listed before it. Same float32 gradients, another summation order: 1e-6.
    (r0, r1), _ = skip_run
    for r in (r0, r1):
        assert sorted(r["reported"], key=int) == [str(s) for s in range(12)]  # every step logs
        for step, ref in r["reference"].items():
            got = r["reported"][step]
            pairs = [(got["gradguard/total_norm"], ref["total"])]
            pairs += [(got[f"gradguard/layer/{name}"], value) for name, value in ref["layers"].items()]
            assert len(got) == len(pairs) == 4  # the total and l0, l1, l2
            # DDP's gradient is the average of every rank's own gradient, gathered here independently
            pairs.append((got["gradguard/total_norm"], ref["averaged_total"]))
            for reported, expected in pairs:
                if math.isnan(expected):
                    assert math.isnan(reported), (step, reported)
                else:
                    assert reported == pytest.approx(expected, rel=1e-6), (step, reported, expected)
            # NaN gradients at steps 2 and 4 on both ranks (DDP averaged them), finite everywhere else
            assert math.isnan(ref["total"]) == (int(step) in (2, 4)), (step, ref["total"])
            if int(step) not in (2, 4):
                assert ref["grad_vs_averaged"] <= 1e-6, (step, ref["grad_vs_averaged"])
    assert same(r0["reported"], r1["reported"])  # the same norms on both ranks, to the bit
    assert same(r0["reference"], r1["reference"])  # of the same gradients


def test_weights_and_optimizer_state_bit_identical_on_both_ranks_skipped_steps_unchanged(skip_run: Any) -> None:
    _, (s0, s1) = skip_run
    assert_ranks_bit_identical(s0, s1)
    for s in (s0, s1):
        for step in SKIPPED:
            assert_unchanged(s, step)
        for step in HEALTHY:  # the comparison can fail: a step taken changes the weights and Adam's moments
            with pytest.raises(AssertionError):
                assert_unchanged(s, step)


def test_a_finite_loss_spike_on_one_rank_is_skipped_on_both(skip_run: Any) -> None:
    # Rank 1's loss is raised by 1e6 with its gradients untouched: rank 0 sees a normal loss and the
    # same (averaged) gradients as rank 1, so only rank 1's statistics fire; the flags' sum skips both.
    (r0, r1), (s0, s1) = skip_run
    assert r1["losses"]["6"] > 1e6 and r0["losses"]["6"] < 10
    assert r0["reported"]["6"] == r1["reported"]["6"]  # finite, the same norms
    for r, s in ((r0, s0), (r1, s1)):
        assert [e[:5] for e in r["full_events"] if e[1] == 6] == [["spike_skipped", 6, None, [], "skipped"]]
        assert_unchanged(s, 6)


def test_a_nonfinite_loss_on_one_rank_with_finite_gradients_is_skipped_on_both(skip_run: Any) -> None:
    # Rank 1's loss is NaN by a constant added to it: its gradients, and the averaged ones, stay finite.
    (r0, r1), (s0, s1) = skip_run
    assert math.isnan(r1["losses"]["7"]) and math.isfinite(r0["losses"]["7"])
    for r, s in ((r0, s0), (r1, s1)):
        assert math.isfinite(r["reference"]["7"]["total"])
        assert [e[:5] for e in r["full_events"] if e[1] == 7] == [["nonfinite", 7, "loss", [], "skipped"]]
        assert_unchanged(s, 7)


def test_a_loss_spike_on_one_rank_rolls_both_ranks_back_to_the_same_snapshot(skip_run: Any) -> None:
    # Rollback(spike_zscore=1000, spike_patience=2): rank 1's loss spikes at steps 9 and 10 only.
    (r0, r1), (s0, s1) = skip_run
    assert all(r1["losses"][k] > 1e6 and r0["losses"][k] < 10 for k in ("9", "10"))
    rollbacks = []
    for r, s in ((r0, s0), (r1, s1)):
        (rollback,) = [e for e in r["full_events"] if e[0] == "rollback"]
        assert rollback[1] == 10 and rollback[5] == 8.0 and "confirmed spike" in rollback[6]
        # the snapshot of step 8 (the state before step 8's update), restored in place: steps 8-10 undone
        assert_same_state(s["after"][10], s["before"][8])
        rollbacks.append(rollback)
    assert same(*rollbacks)  # the same event, message and snapshot on both ranks
    assert_same_state(s0["after"][10], s1["after"][10])


def test_events_identical_on_both_ranks_whole(skip_run: Any) -> None:
    """Every event, whole, on both ranks: a spike_skipped event's z-score is the one that decided (each
    rank's own z rides in the flags' collective; the largest is reported), not each rank's own."""
    (r0, r1), _ = skip_run
    assert same(r0["full_events"], r1["full_events"])


def test_fused_optimizer_skips_on_the_device_on_both_ranks(tmp_path: Path) -> None:
    # step 2 (a logging step) is skipped by the guard; step 4's NaN (rank 0 only) is skipped by
    # AdamW(fused=True) through found_inf, summed across ranks on the device, and read at step 5
    r0, r1 = run_ddp(tmp_path, "fused")
    assert r0["events"] == r1["events"] == SKIPPED_EVENTS
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["finite"] and r1["finite"]
    assert r0["deferred"] == r1["deferred"] == [0, 1, 3, 4]  # non-logging steps: no read, skipped on the device
    s0, s1 = states(tmp_path)
    assert_ranks_bit_identical(s0, s1)
    for s in (s0, s1):  # found_inf: the fused kernel left the weights and its state as they were
        assert_unchanged(s, 2)
        assert_unchanged(s, 4)


def test_raise_on_one_rank_raises_on_both_without_hang(tmp_path: Path) -> None:
    # Each rank records its NonFiniteGradientError, then meets the other at a barrier before
    # re-raising: had one rank not raised, the barrier would hang and the timeout would fail the test.
    # (Lightning then tears the process group down; the exit status is not what is tested.)
    r0, r1 = run_ddp(tmp_path, "raise", prefix="raised", check=False)
    assert r0["step"] == r1["step"] == 2
    assert "origin 'loss'" in str(r0["error"]) and "origin 'loss'" in str(r1["error"])


@pytest.mark.parametrize("policy", ["stop"])
def test_stop_is_shared(tmp_path: Path, policy: str) -> None:
    r0, r1 = run_ddp(tmp_path, policy)
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["skipped"] == r1["skipped"] == 1


def test_zclip_statistics_identical_on_both_ranks(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "zclip")
    assert r0["coefs"] == r1["coefs"] and len(r0["coefs"]) == 6  # type: ignore[arg-type]
    assert r0["clip_state"] == r1["clip_state"]
    state = r0["clip_state"]
    assert state["mean"] is not None and state["buffer"] == []  # type: ignore[index]  # warm-up (2) done
    assert any(c < 1.0 for c, _ in r0["coefs"])  # type: ignore[union-attr]
    assert r0["skipped"] == r1["skipped"] == 2
    assert_ranks_bit_identical(*states(tmp_path))


def test_detection_identical_on_both_ranks_told_once(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "detect")
    assert r0["events"] == r1["events"]
    kinds = [(e[0], e[1]) for e in r0["events"]]  # type: ignore[union-attr]
    assert kinds == [("exploding", 0), ("exploding", 1), ("nonfinite", 2), ("exploding", 3), ("nonfinite", 4),
                     ("exploding", 5)]
    assert (tmp_path / "handler0.txt").read_text().split("\n")[:-1] == [f"{k} {s}" for k, s in kinds]
    assert not (tmp_path / "handler1.txt").exists()  # rank 1 computes the same events but does not tell
