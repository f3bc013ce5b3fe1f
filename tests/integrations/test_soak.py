"""Soak: 5,000 steps with seeded random faults and every feature on; SIGKILL mid-run and resume.

Marked slow: `make soak` runs it, `make test` does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "soak_run.py"
ROOT = SCRIPT.parents[1]

pytestmark = pytest.mark.slow


def run(out: Path, steps: int, *extra: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(steps), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())  # type: ignore[no-any-return]


def test_soak_5000_steps(tmp_path: Path) -> None:
    r = run(tmp_path / "soak", 5000)
    print(json.dumps({k: v for k, v in r.items() if k != "clip_state"}, indent=1))
    assert r["global_step"] == r["steps"] == 5000
    assert r["faults"] > 50  # a seeded 2%: about 100
    assert r["skipped"] == r["nonfinite"] == r["faults"]  # every injected fault skipped, nothing else
    assert r["finite"]
    assert r["events"] <= r["max_events"]
    assert 1 <= len(r["dumps"]) <= 5
    assert r["rss_growth_mb"] is not None and r["rss_growth_mb"] < 50


def test_sigkill_and_resume_lose_nothing_and_count_nothing_twice(tmp_path: Path) -> None:
    steps = 1200
    reference = run(tmp_path / "ref", steps)
    ckpt = tmp_path / "ckpt"
    killed_out = tmp_path / "killed"
    killed_out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(killed_out), str(steps), "--ckpt-dir", str(ckpt)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    last = ckpt / "last.ckpt"
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and last.stat().st_size > 0:
            time.sleep(2.0)  # let it train a while past the first checkpoint
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed_out / "result.json").exists()
    resumed = run(tmp_path / "resumed", steps, "--resume", str(last), "--ckpt-dir", str(ckpt))
    for key in ("steps", "global_step", "faults", "skipped", "nonfinite", "clipped", "origins", "clip_state"):
        assert resumed[key] == reference[key], key
    assert resumed["finite"]
