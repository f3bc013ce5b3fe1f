"""A rollback (and a replay's verdict) under Lightning's DDP and ModelParallelStrategy (FSDP2, tensor
parallel), 2 CPU processes (gloo).

A NaN gradient on rank 1 only, two steps in a row (tests/rollback_run.py): both ranks roll back at
the same step to the same snapshot, and the full (unsharded) weights and Adam moments right after the
rollback equal those before the snapshot's step, on both ranks. With a fault that never ends,
``max_rollbacks`` raises on both ranks (a rank left behind would hang the other: the run completes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import launch

SCRIPT = Path(__file__).resolve().parents[1] / "rollback_run.py"


def run(out: Path, mode: str) -> list[dict[str, Any]]:
    ranks = torch.cuda.device_count() if mode.startswith("fsdp1") else 2
    proc = launch(SCRIPT, str(out), mode)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"{mode}{r}.json").read_text()) for r in range(ranks)]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs CUDA")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "tp", pytest.param("fsdp1", marks=CUDA)])
def test_a_fault_on_one_rank_rolls_every_rank_back_to_the_same_snapshot(tmp_path: Path, mode: str) -> None:
    ranks = run(tmp_path, mode)
    for r in ranks:
        assert r["error"] is None and r["global_step"] == 12  # the run completed
        assert r["events"][:3] == [["nonfinite", 5, None], ["nonfinite", 6, None], ["rollback", 6, 4]]
        assert r["rollbacks"] == 1
        # the full weights and Adam state right after the rollback = before step 4 (the snapshot)
        assert r["after"]["6"] == r["before"]["4"]
        assert r["after"]["6"]["moments"]  # Adam's state was there to restore
    if mode != "fsdp1":  # FSDP1's state is compared per rank (its flat shards)
        assert ranks[0]["after"]["6"] == ranks[-1]["after"]["6"]


def test_a_transient_fault_on_rank_1_is_replayed_on_every_rank_and_names_rank_1(tmp_path: Path) -> None:
    ranks = run(tmp_path, "ddp_transient")
    for r in ranks:
        (replay,) = r["replays"]
        assert replay["verdict"] == "transient" and replay["faulty_ranks"] == [1]
        assert [(x["rank"], x["verdict"], x["local_fault"]) for x in replay["ranks"]] == [
            (0, "transient", False), (1, "transient", True),
        ]  # fmt: skip
    assert ranks[0]["replays"] == ranks[1]["replays"]


@pytest.mark.parametrize("mode", ["ddp_limit", "fsdp2_limit", "tp_limit", pytest.param("fsdp1_limit", marks=CUDA)])
def test_max_rollbacks_raises_on_every_rank(tmp_path: Path, mode: str) -> None:
    ranks = run(tmp_path, mode)
    for r in ranks:
        assert "did not recover" in r["error"] and "max_rollbacks=1" in r["error"]
        assert r["global_step"] == 8 and r["events"][-1] == ["stopped", 8, None]
