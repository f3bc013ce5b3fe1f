"""The ``gradguard`` command: its entry points, and how it starts."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_gradguard import GradGuard
from lightning_gradguard.cli import main
from tests.helpers import FaultNet, trainer


def test_python_dash_m_and_the_function_are_the_same_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_gradguard", "report", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 == main(["report", str(tmp_path / "none")])
    assert "no such directory" in proc.stderr


# ----------------------------------------------------------------------------- short runs
def _fit(root: Path, name: str, faults: dict[int, tuple[Any, ...]], steps: int, every: int) -> GradGuard:
    guard = GradGuard(images=False)  # log_every_n_steps None: the Trainer's cadence
    logger = TensorBoardLogger(root, name=name, version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer([guard], steps=steps, logger=logger, log_every_n_steps=every).fit(FaultNet(faults))
    return guard


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_shorter_than_its_cadence_is_reported_from_its_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """40 steps under the Trainer's default log_every_n_steps=50: no logging step, no metric; the report
    says so and judges the events the guard recorded, instead of asking whether the guard was there."""
    faulty = _fit(tmp_path, "faulty", {7: ("grad", 1, math.nan)}, steps=40, every=50)
    healthy = _fit(tmp_path, "healthy", {}, steps=40, every=50)
    assert faulty.last_report is not None and not faulty.last_report.logged  # not one logging step
    (live,) = [e for e in faulty.events if e.kind == "nonfinite"]
    assert (live.step, live.origin, live.layers, live.action) == (7, "l1", ("l0", "l1"), "skipped")
    assert healthy.events == []

    code, out, err = _report(capsys, str(tmp_path / "faulty"))
    assert code == 1 and err == ""  # a non-finite step
    assert f"== {tmp_path / 'faulty'} (40 steps, no logging step)\n" in out
    assert "  step 7: origin l1 (skipped), layers l0,l1\n" in out
    assert "skipped steps: 1; non-finite steps: 1\n" in out
    assert "verdict: unhealthy: 1 non-finite step (1 skipped): non-finite gradients at step 7, beginning in l1" in out

    code, out, _ = _report(capsys, str(tmp_path / "healthy"))
    assert code == 0
    assert f"== {tmp_path / 'healthy'} (40 steps, no logging step)\n" in out
    assert ("verdict: healthy: 40 steps, no logging step (log_every_n_steps=50): no non-finite step; no gradient norm "
            "was logged, so the layers are not judged\n") in out  # fmt: skip

    code, out, _ = _report(capsys, str(tmp_path), "--json")
    reps = {Path(r["run"]).name: r for r in json.loads(out)}
    assert code == 1  # the worst of the two
    assert (reps["faulty"]["steps"], reps["faulty"]["logged_steps"]) == (40, 0) == (
        reps["healthy"]["steps"], reps["healthy"]["logged_steps"])  # fmt: skip
    assert reps["faulty"]["nonfinite"] == [{"step": 7, "origin": "l1", "action": "skipped", "layers": "l0,l1"}]
    assert reps["faulty"]["replays"] == [{"step": 7, "kind": "nonfinite", **{
        k: live.extra["replay"][k] for k in ("verdict", "forward_origin", "input_nonfinite", "faulty_ranks")}}]
    assert (reps["faulty"]["severity"], reps["healthy"]["severity"]) == ("unhealthy", "healthy")

    from tensorboard import context

    from tests.tensorboard.test_tab import _plugin_for

    tab = _plugin_for(tmp_path)  # the tab reads the same summary through TensorBoard's data provider
    for name, rep in reps.items():
        assert tab.report(context.RequestContext(), "", name)["verdict"] == rep["verdict"]


# ----------------------------------------------------------------------------- folders of runs
def _cut_mid_record(src: Path, dst: Path) -> tuple[int, int]:
    """Copy ``src`` into ``dst`` cut in the middle of its last record (a run killed while writing); that
    record's index and where it starts."""
    data = src.read_bytes()
    starts, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        starts.append((pos, length))
        pos += 16 + length
    assert pos == len(data) and len(starts) > 3
    start, length = starts[-1]
    dst.mkdir(parents=True)
    (dst / src.name).write_bytes(data[: start + 12 + length // 2])
    return len(starts) - 1, start


def test_report_of_a_folder_reports_every_readable_run_and_lists_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One good run, one killed mid-write (its event file cut in a record), one TensorBoard run without
    the guard: the good run is reported, the other two are listed with why, and the exit status is the
    worst among them (an unreadable run counts as 2)."""
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    good = _fit(runs, "good", {2: ("grad", 1, math.nan)}, steps=6, every=1)
    (src,) = (runs / "good").glob("events.out.tfevents.*")
    record, at = _cut_mid_record(src, runs / "killed")
    writer = SummaryWriter(str(runs / "plain"))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    assert good.last_report is not None and good.last_report.logged

    code, out, err = _report(capsys, str(runs))
    assert code == 2
    killed_why = f"truncated event file {runs / 'killed' / src.name}: record {record} is cut at byte {at}"
    plain_why = f"{runs / 'plain'} holds no gradguard/ metrics: was GradGuard among the Trainer's callbacks?"
    assert f"== {runs / 'good'} (6 steps)\n" in out  # the good run, reported in full
    assert "  step 2: origin l1 (skipped), layers l0,l1\n" in out and "verdict: unhealthy" in out
    block = out[out.index("== 2 unreadable runs\n") :].splitlines()
    assert len(block) == 3 and block[0] == "== 2 unreadable runs"
    assert block[1] == f"  {runs / 'killed'}: {killed_why}"
    assert block[2] == f"  {runs / 'plain'}: {plain_why}"
    errors = err.splitlines()
    assert len(errors) == 2 and "Traceback" not in err
    assert errors[0] == f"gradguard report: error: {killed_why}"
    assert errors[1] == f"gradguard report: error: {plain_why}"

    code, out, _ = _report(capsys, str(runs), "--json")
    rows = {Path(r["run"]).name: r for r in json.loads(out)}
    assert code == 2 and set(rows) == {"good", "killed", "plain"}
    assert rows["good"]["nonfinite"] == [{"step": 2, "origin": "l1", "action": "skipped", "layers": "l0,l1"}]
    assert rows["good"]["steps"] == rows["good"]["logged_steps"] == 6
    assert rows["killed"]["severity"] == rows["plain"]["severity"] == "unreadable"
    assert (rows["killed"]["unreadable"], rows["plain"]["unreadable"]) == (killed_why, plain_why)
    assert rows["plain"]["verdict"] == f"unreadable: {plain_why}"

    # the exit status is the worst among the runs: a readable faulty run alone is 1, a healthy one 0
    assert _report(capsys, str(runs / "good"))[0] == 1
    _fit(tmp_path / "fine", "fine", {}, steps=6, every=1)
    assert _report(capsys, str(tmp_path / "fine"))[0] == 0
    shutil.copytree(runs / "plain", tmp_path / "fine" / "plain")
    code, out, err = _report(capsys, str(tmp_path / "fine"))
    assert code == 2 and "verdict: healthy" in out and len(err.splitlines()) == 1
