"""The checkpoint gate under Lightning's DDP and ModelParallelStrategy (FSDP2), 2 CPU processes (gloo):
a NaN in rank 1's own weights makes both ranks defer the same save, and the rollback that follows
quarantines the same checkpoints on both (tests/checkpoint_run.py). A rank deciding alone would hang
its neighbour in the save's collectives: the run completing is part of the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradguard.cli import main as cli_main
from tests.helpers import launch

SCRIPT = Path(__file__).resolve().parents[1] / "checkpoint_run.py"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs CUDA")


def run(out: Path, mode: str) -> list[dict[str, Any]]:
    ranks = torch.cuda.device_count() if mode == "fsdp1" else 2
    proc = launch(SCRIPT, str(out), mode)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"{mode}{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", pytest.param("fsdp1", marks=CUDA)])
def test_a_fault_on_one_rank_defers_and_quarantines_the_same_way_on_every_rank(
    tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ranks = run(tmp_path, mode)
    for r in ranks:
        assert r["global_step"] == 10  # the run completed: no rank hung in a save
        assert r["events"] == [
            ["nonfinite", 6, "skipped"], ["checkpoint", 7, "deferred"], ["nonfinite", 7, "skipped"],
            ["rollback", 7, "rolled back"],
        ]  # fmt: skip
        assert r["quarantined"] == [["epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt", "last.ckpt -> epoch=0-step=4.ckpt"]]
        steps = [(step, quarantined) for _, step, _, quarantined in r["records"]]
        assert steps == [(1, False), (2, False), (3, False), (4, False), (5, True), (6, True), (8, False),
                         (9, False), (10, False), (10, False)]  # fmt: skip
    assert ranks[0]["records"] == ranks[1]["records"]
    # The bad tensor is named where it is; its neighbour defers on its word.
    assert ranks[1]["why"][0][0] == "non-finite weights or optimizer state: l1.weight (1 non-finite value)"
    assert ranks[0]["why"][0][0] == "non-finite weights or optimizer state (on another rank)"
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert [k for k in kept if "quarantined" in k] == ["epoch=0-step=5.ckpt.quarantined",
                                                      "epoch=0-step=6.ckpt.quarantined"]  # fmt: skip
    assert cli_main(["check", str(tmp_path / "ckpt" / "last.ckpt")]) == 0
    assert cli_main(["check", str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt.quarantined")]) == 1
    if mode == "fsdp2":  # a distributed checkpoint's directory, read back whole
        assert "last.ckpt: healthy (distributed checkpoint, step 10, " in capsys.readouterr().out
