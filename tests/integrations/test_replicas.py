"""Replicas that agree: the replica check's checksum, vote and groups, and the check under Lightning's
DDP on 3 processes (gloo) with a simulated silent data corruption: one mantissa bit of one weight
flipped on rank 1 (tests/replica_run.py, every mode in one launch)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradguard import GuardCore, Replicas, Rollback
from lightning_gradguard.core.replicas import ReplicaCheck, _replica_groups, _Slot, _vote, checksum, checksums
from tests.helpers import launch

SCRIPT = Path(__file__).resolve().parents[1] / "replica_run.py"
MODES = ("off", "warn", "repair", "stop", "rollback")


# ---------------------------------------------------------------------------- the checksum
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_single_bit_flip_changes_the_checksum(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    t = torch.randn(7, 5).to(dtype)
    bits = t.element_size() * 8
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    base = int(checksum(t))
    assert base == int(checksum(t.clone()))  # the same bits, the same checksum
    for element in (0, 17, 34):
        for bit in range(bits):
            flipped = t.clone()
            view = flipped.view(-1).view(words)
            view[element] = view[element] ^ (torch.tensor(1, dtype=torch.int64) << bit).to(words)
            assert int(checksum(flipped)) != base, (dtype, element, bit)


def test_the_checksum_is_the_words_summed_modulo_2_32() -> None:
    t = torch.tensor([1.0, -2.5, 3.25, float("inf")])
    words = [int(w) & 0xFFFFFFFF for w in t.view(torch.int32)]  # the same bits as unsigned words
    expected = sum(int(w) for w in t.view(torch.int32)) % 2**32
    assert int(checksum(t)) == expected == sum(w if w < 2**31 else w - 2**32 for w in words) % 2**32


def test_checksums_by_slot_travel_as_exact_16_bit_halves() -> None:
    a, b, c = torch.randn(3, 3), torch.randn(4), torch.randn(2, 2)
    halves = checksums([a, b, c], [0, 0, 1], 2, torch.device("cpu"))
    joined = [int(high) * 2**16 + int(low) for high, low in halves.tolist()]
    assert joined == [(int(checksum(a)) + int(checksum(b))) % 2**32, int(checksum(c))]
    assert halves.dtype == torch.float32 and float(halves.max()) < 2**16


# ---------------------------------------------------------------------------- the vote and the groups
def test_a_majority_names_the_odd_rank_and_two_replicas_name_both() -> None:
    slots = [_Slot("l0", [0], [[0, 1, 2]]), _Slot("l1", [1], [[0, 1, 2]])]
    assert _vote(slots, [[5, 9], [5, 8], [5, 9]]) == ([1], [0, 1, 2], ["l1"], True)
    assert _vote(slots, [[5, 9], [5, 9], [5, 9]]) == ([], [], [], True)
    pair = [_Slot("l0", [0], [[0, 1]])]
    assert _vote(pair, [[1], [2]]) == ([0, 1], [0, 1], ["l0"], False)
    three_ways = [_Slot("w", [0], [[0, 1, 2]])]
    assert _vote(three_ways, [[1], [2], [3]]) == ([0, 1, 2], [0, 1, 2], ["w"], False)


class _Placement:
    def __init__(self, replicate: bool) -> None:
        self.replicate = replicate

    def is_replicate(self) -> bool:
        return self.replicate


class _Mesh:
    def __init__(self, mesh: torch.Tensor) -> None:
        self.mesh = mesh


class _Sharded:
    """What the groups read of a DTensor: its mesh of global ranks and its placements."""

    def __init__(self, mesh: torch.Tensor, replicate: list[bool]) -> None:
        self.device_mesh = _Mesh(mesh)
        self.placements = [_Placement(r) for r in replicate]


def test_replica_groups_follow_the_placements() -> None:
    plain = torch.zeros(2)
    assert _replica_groups(plain, 3) == [[0, 1, 2]] and _replica_groups(plain, 1) is None
    hsdp = torch.arange(4).reshape(2, 2)  # (replicate, shard): ranks 0,2 hold one shard, 1,3 the other
    assert _replica_groups(_Sharded(hsdp, [True, False]), 4) == [[0, 2], [1, 3]]  # type: ignore[arg-type]
    assert _replica_groups(_Sharded(torch.arange(2), [False]), 2) is None  # type: ignore[arg-type]  # FSDP2
    assert _replica_groups(_Sharded(torch.arange(2), [True]), 2) == [[0, 1]]  # type: ignore[arg-type]  # TP's


# ---------------------------------------------------------------------------- on one process
def test_on_one_process_the_check_costs_nothing() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, replicas=Replicas(every=1))
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        guard.step(opt)
        opt.step()
        opt.zero_grad()
    check = guard.component("replicas")
    assert isinstance(check, ReplicaCheck) and check.checks == 0 and check._off == "one process: nothing to compare"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every": 0}, ValueError, "Expected `every` to be an int >= 1 or None, but got 0."),
        ({"every": 2.5}, ValueError, "Expected `every` to be an int >= 1 or None, but got 2.5."),
        ({"every": True}, ValueError, "Expected `every` to be an int >= 1 or None, but got True."),
        ({"action": "fix"}, ValueError, "Expected `action` to be one of 'warn', 'repair', 'rollback', 'stop', "
                                        "but got 'fix'."),
    ],
)  # fmt: skip
def test_bad_replicas_arguments_are_refused_by_name(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Replicas(**kwargs)


def test_the_replicas_option_is_checked_against_the_others() -> None:
    with pytest.raises(TypeError, match=r"Expected `replicas` to be a Replicas .* or None, but got 'warn'"):
        GuardCore(replicas="warn")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"Expected `rollback` to be a Rollback\(...\) for Replicas\(action='rollback'\)"
    ):
        GuardCore(replicas=Replicas(action="rollback"))
    GuardCore(replicas=Replicas(action="rollback"), rollback=Rollback(every=10))


# ---------------------------------------------------------------------------- 3 DDP processes
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("replicas")
    proc = launch(SCRIPT, str(out), *MODES)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {m: [json.loads((out / f"{m}{r}.json").read_text()) for r in range(3)] for m in MODES}


def _same_on_every_rank(ranks: list[dict[str, Any]], key: str) -> Any:
    assert ranks[0][key] == ranks[1][key] == ranks[2][key], key
    return ranks[0][key]


def test_without_a_check_the_replicas_stay_different_to_the_end(runs: dict[str, list[dict[str, Any]]]) -> None:
    r0, r1, r2 = runs["off"]
    assert r0["events"] == r1["events"] == [] and r0["global_step"] == 16
    assert r0["final"] == r2["final"] and r1["final"] != r0["final"]  # rank 1's flipped bit, never noticed


def test_the_next_check_names_rank_1_and_the_layer(runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = runs["warn"]
    events = _same_on_every_rank(ranks, "events")
    assert events == [["replica_divergence", 7, "warned"], ["replica_divergence", 11, "warned"],
                      ["replica_divergence", 15, "warned"]]  # fmt: skip  # the flip at 5, the checks at 3, 7, ...
    first = _same_on_every_rank(ranks, "divergences")[0]
    assert (first["ranks"], first["layers"], first["majority"]) == ([1], ["l1"], True)
    assert set(first["devices"]) == {"0", "1", "2"} and all(
        {"host", "device"} <= set(d) for d in first["devices"].values()
    )
    message = ranks[0]["messages"][0]
    assert message.startswith("GradGuard: replicas diverged at step 7: rank 1 (")
    assert "differs from the majority of the replicas, in 1 layer: l1." in message
    assert ranks[1]["final"] != ranks[0]["final"]  # warn changes nothing


def test_repair_makes_the_replicas_bit_identical_and_the_run_finishes(runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = runs["repair"]
    assert _same_on_every_rank(ranks, "events") == [["replica_divergence", 7, "repaired"]]  # never again
    first = ranks[0]["divergences"][0]
    assert (first["ranks"], first["repaired"], first["source"]) == ([1], True, 0)
    assert "repaired from rank 0: the replicas agree again" in ranks[0]["messages"][0]
    assert ranks[0]["global_step"] == 16 and ranks[0]["final"] == ranks[1]["final"] == ranks[2]["final"]


def test_stop_ends_the_run_on_every_rank(runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = runs["stop"]
    assert _same_on_every_rank(ranks, "events") == [["replica_divergence", 7, "stopped"]]
    assert _same_on_every_rank(ranks, "global_step") == 8


def test_rollback_restores_a_snapshot_from_before_the_flip_on_every_rank(runs: dict[str, list[dict[str, Any]]]) -> None:
    ranks = runs["rollback"]
    assert _same_on_every_rank(ranks, "events") == [["replica_divergence", 7, "rollback requested"],
                                                    ["rollback", 7, "rolled back"]]  # fmt: skip
    assert ranks[0]["final"] == ranks[1]["final"] == ranks[2]["final"]  # the snapshot of step 4 predates the flip


def test_only_check_steps_add_to_the_collective(runs: dict[str, list[dict[str, Any]]]) -> None:
    off, warn = runs["off"][0]["reduce_sizes"], runs["warn"][0]["reduce_sizes"]
    assert set(off) == set(warn) == {str(s) for s in range(16)}
    layers = 3
    for step in range(16):
        extra = 3 * layers * 2 if (step + 1) % 4 == 0 else 0  # world x layers x two 16-bit halves
        assert warn[str(step)] == off[str(step)] + extra, step


# ---------------------------------------------------------------------------- HSDP, 4 processes
def test_under_hsdp_the_check_compares_each_shard_across_its_replicate_dimension(tmp_path: Path) -> None:
    """FSDP2 over a 2-D mesh [[0, 1], [2, 3]] (replicate, shard): ranks 0 and 2 hold one shard, 1 and 3
    the other. Rank 2's flipped bit makes 0 and 2 disagree in l1, and no one else; with two replicas no
    majority tells which is wrong, so both are named, on every rank alike."""
    proc = launch(Path(__file__).resolve().parents[1] / "hsdp_replica_run.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"hsdp{r}.json").read_text()) for r in range(4)]
    assert all(r["mesh"] == [[0, 1], [2, 3]] for r in ranks)
    expected = [{"step": s, "layers": ["l1"], "ranks": [0, 2], "apart": [0, 2], "majority": False} for s in (7, 11)]
    assert all(r["divergences"] == expected for r in ranks), [r["divergences"] for r in ranks]
    assert all(r["checks"] == 3 for r in ranks)  # steps 3, 7, 11: the flip at 5 is found at the next check
