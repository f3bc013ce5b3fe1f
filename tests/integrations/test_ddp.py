"""DDP with 2 CPU processes (gloo): a fault on one rank leads every rank to the same decision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


# rank 1: a NaN loss at step 2; rank 0: a NaN gradient at l1 at step 4 (tests/ddp_run.py)
SKIPPED_EVENTS = [
    ["nonfinite", 2, "loss", ["l0", "l1", "l2"], "skipped"],
    ["nonfinite", 4, "l1", ["l0", "l1"], "skipped"],
]


def test_fault_on_one_rank_skips_on_both(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "skip")
    assert r0["events"] == r1["events"] == SKIPPED_EVENTS
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["global_step"] == r1["global_step"] == 6
    assert r0["finite"] and r1["finite"]
    assert r0["weights"] == r1["weights"]


def test_fused_optimizer_skips_on_the_device_on_both_ranks(tmp_path: Path) -> None:
    # step 2 (a logging step) is skipped by the guard; step 4's NaN (rank 0 only) is skipped by
    # AdamW(fused=True) through found_inf, summed across ranks on the device, and read at step 5
    r0, r1 = run_ddp(tmp_path, "fused")
    assert r0["events"] == r1["events"] == SKIPPED_EVENTS
    assert r0["skipped"] == r1["skipped"] == 2
    assert r0["finite"] and r1["finite"] and r0["weights"] == r1["weights"]
    assert r0["deferred"] == r1["deferred"] == [0, 1, 3, 4]  # non-logging steps: no read, skipped on the device


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
    assert r0["weights"] == r1["weights"] and r0["skipped"] == r1["skipped"] == 2


def test_detection_identical_on_both_ranks_told_once(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "detect")
    assert r0["events"] == r1["events"]
    kinds = [(e[0], e[1]) for e in r0["events"]]  # type: ignore[union-attr]
    assert kinds == [("exploding", 0), ("exploding", 1), ("nonfinite", 2), ("exploding", 3), ("nonfinite", 4),
                     ("exploding", 5)]
    assert (tmp_path / "handler0.txt").read_text().split("\n")[:-1] == [f"{k} {s}" for k, s in kinds]
    assert not (tmp_path / "handler1.txt").exists()  # rank 1 computes the same events but does not tell
