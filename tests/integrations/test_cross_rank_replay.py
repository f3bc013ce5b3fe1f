"""Which device? Under DDP the faulty rank's batch is replayed on a partner rank too (2 CPU processes,
gloo, Lightning's DDP strategy: tests/cross_replay_run.py, one launch, one fit per scenario).

A fault that follows the device (a forward hook that breaks rank 1's output whatever the batch) is
``device: rank 1 (host, device)`` with a suspect; a poisoned batch is ``data or numerics``, reproduced
on rank 0; a one-off fault is ``transient``; a partner whose replay raises, or that takes longer than
the exchange's timeout, ends in ``replay failed`` and the run completes on every rank. The rules
themselves (the plan, the verdict, a partner's replay that never raises) are checked on one process.
"""

from __future__ import annotations

import json
import math
import pickle
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.core.attribution import attribute, describe
from lightning_gradguard.core.cross_replay import (
    ReplayClosure,
    _pack,
    _rng_here,
    conclude_cross,
    plan_cross_replay,
    replay_batch_of,
)
from tests.helpers import launch

SCRIPT = Path(__file__).resolve().parents[1] / "cross_replay_run.py"
SCENARIOS = ("device", "data", "transient", "raises", "spike", "plain", "slow")
HOST = platform.node()
PLACE = {"host": HOST, "device": "cpu", "device_name": platform.processor() or platform.machine()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("cross")
    proc = launch(SCRIPT, str(out), *SCENARIOS)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {s: [json.loads((out / f"{s}{r}.json").read_text()) for r in range(2)] for s in SCENARIOS}


def replayed(runs: dict[str, list[dict[str, Any]]], scenario: str, steps: int = 6) -> tuple[dict[str, Any], str]:
    """The scenario's one replay and its event's message, the same on both ranks (a run that completed)."""
    ranks = runs[scenario]
    for r in ranks:
        assert r["global_step"] == steps and len(r["replays"]) == 1
    assert ranks[0]["replays"] == ranks[1]["replays"] and ranks[0]["messages"] == ranks[1]["messages"]
    return ranks[0]["replays"][0], ranks[0]["messages"][0]


def test_a_fault_that_follows_the_device_names_rank_1_as_the_suspect(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "device")
    assert replay["verdict"] == f"device: rank 1 ({HOST}, cpu)"
    assert replay["suspect"] == {"rank": 1, **PLACE}
    assert replay["faulty_ranks"] == [1] and replay["reproduced_on"] == [1]
    cross = replay["cross"]
    assert (cross["rank"], cross["batch_of"], cross["verdict"], cross["replays"]) == (0, 1, "transient", 2)
    assert [(x["rank"], x["verdict"]) for x in replay["ranks"]] == [(0, "transient"), (1, "data or numerics")]
    assert replay["forward_origin"] == "l1" and not replay["input_nonfinite"]  # where rank 1 broke it
    assert (
        f"Replay: device (reproduces on rank 1, but not with its batch on rank 0): suspect the device of rank 1, "
        f"host {HOST}, cpu ({PLACE['device_name']}); the forward pass first went non-finite in l1."
    ) in message


def test_a_poisoned_batch_reproduces_on_the_partner(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "data")
    assert replay["verdict"] == "data or numerics" and "suspect" not in replay
    assert replay["reproduced_on"] == [1, 0] and replay["faulty_ranks"] == [1]
    cross = replay["cross"]
    assert (cross["rank"], cross["batch_of"], cross["verdict"]) == (0, 1, "data or numerics")
    assert (cross["forward_origin"], cross["input_nonfinite"]) == ("l0", True)  # the NaN came with the batch
    assert "Replay: data or numerics (reproduces in float32; reproduced on rank 0 with rank 1's batch)" in message


def test_a_one_off_fault_reproduces_nowhere(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "transient")
    assert replay["verdict"] == "transient" and replay["reproduced_on"] == [] and "suspect" not in replay
    assert (replay["cross"]["rank"], replay["cross"]["verdict"], replay["cross"]["replays"]) == (0, "transient", 2)
    assert "Replay: transient (did not reproduce in 2 replays, nor in 2 on rank 0 with rank 1's batch)" in message


def test_a_partner_whose_replay_raises_fails_that_part_only(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "raises")  # both ranks completed the run, and agree
    error = "RuntimeError: rank 0 cannot run on a non-finite batch"
    assert replay["verdict"] == f"replay failed: rank 0 could not replay rank 1's batch: {error}"
    assert replay["cross"]["error"] == error and replay["reproduced_on"] == [1]
    assert replay["ranks"][1]["verdict"] == "data or numerics"  # rank 1's own replay stands
    assert f"Replay: replay failed: rank 0 could not replay rank 1's batch: {error} (rank 1's own replay: " in message


def test_a_spike_s_replays_record_their_norms_beside_the_step_s(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "spike", steps=10)
    ranks = runs["spike"]
    (event,) = [e for e in ranks[0]["events"] if e[0] == "spike_skipped"]
    assert event[1] == 7 and replay["spike_norm"] == event[2]
    # float32 sums in another order (the reference's one concatenated norm): a relative 1e-5
    assert replay["spike_norm"] == pytest.approx(ranks[0]["reference"]["step"], rel=1e-5)
    own_0, own_1 = ranks[0]["reference"]["own"], ranks[1]["reference"]["own"]  # each rank's own batch
    assert replay["grad_norms"] == [pytest.approx(own_1, rel=1e-5)]  # rank 1's batch, on rank 1
    assert replay["cross"]["grad_norms"] == [pytest.approx(own_1, rel=1e-5)]  # rank 1's batch, on rank 0
    assert replay["ranks"][0]["grad_norms"] == [pytest.approx(own_0, rel=1e-5)] * 2  # rank 0's own: twice
    # the rule: a replay reproduces the spike at half its norm or more
    assert own_1 >= 0.5 * replay["spike_norm"] > own_0
    assert replay["ranks"][0]["verdict"] == "transient" and replay["verdict"] == "data or numerics"
    assert replay["reproduced_on"] == [1, 0] and replay["cross"]["batch_of"] == 1
    assert "reproduced on rank 0 with rank 1's batch); total gradient norm " in message


def test_a_closure_that_cannot_take_another_batch_gets_no_cross_rank_replay(runs: dict[str, Any]) -> None:
    replay, message = replayed(runs, "plain")
    assert replay["verdict"] == "data or numerics" and "cross" not in replay  # gathered, as before
    assert replay["no_cross"] == "the replay closure cannot take another batch"
    assert message.endswith("; no cross-rank replay: the replay closure cannot take another batch.")


def test_a_partner_slower_than_the_timeout_leaves_no_rank_waiting(runs: dict[str, Any]) -> None:
    ranks = runs["slow"]
    for r in ranks:
        assert r["global_step"] == 6 and len(r["replays"]) == 1  # the run completed on every rank
    replay, message = ranks[1]["replays"][0], ranks[1]["messages"][0]  # rank 1 stopped waiting for rank 0
    assert replay["exchange_failed"] is True and replay["verdict"].startswith("replay failed: ")
    assert "the exchange failed: " in message and "Timed out" in message


# ---------------------------------------------------------------- the rules, on one process
def test_the_partner_is_the_next_rank_that_is_not_faulty() -> None:
    ok, bad = {"verdict": "transient"}, {"verdict": "data or numerics", "local_fault": True}
    once = {"verdict": "transient", "local_fault": True}  # a fault of its own that did not reproduce
    assert plan_cross_replay([ok, bad], True) == (1, 0)
    assert plan_cross_replay([bad, bad, ok, ok], True) == (0, 2)
    assert plan_cross_replay([ok, ok, bad, bad], True) == (2, 0)  # cyclically
    assert plan_cross_replay([ok, once, ok], True) == (1, 2)  # a transient fault: its own flag
    # no communication hook: every rank's averaged gradients are non-finite, only one reproduces it
    everywhere = {"verdict": "transient", "local_fault": True}
    assert plan_cross_replay([everywhere, bad, everywhere], True) == (1, 2)
    assert plan_cross_replay([ok, {"verdict": "data or numerics"}], True) == (1, 0)  # a spike: no flag
    assert plan_cross_replay([bad, bad], True) == "every rank (2) was faulty"
    assert plan_cross_replay([ok, ok], True) == "no rank was found faulty"
    assert plan_cross_replay([ok, bad], False) == "the replay closure cannot take another batch"


def test_the_verdict_from_both_replays() -> None:
    own = {"verdict": "data or numerics", "rank": 1, "forward_origin": "l1", **PLACE}
    device = conclude_cross(own, {"verdict": "transient", "rank": 0})
    assert device["verdict"] == f"device: rank 1 ({HOST}, cpu)" and device["suspect"] == {"rank": 1, **PLACE}
    data = conclude_cross(own, {"verdict": "data or numerics", "rank": 0})
    assert data["verdict"] == "data or numerics" and data["reproduced_on"] == [1, 0] and "suspect" not in data
    precision = conclude_cross(own, {"verdict": "precision", "rank": 0})
    assert precision["verdict"] == "precision"  # the partner's verdict
    failed = conclude_cross(own, {"verdict": "replay failed: OSError: gone", "rank": 0})
    assert failed["verdict"] == "replay failed: rank 0 could not replay rank 1's batch: OSError: gone"
    transient = {**own, "verdict": "transient", "forward_origin": None}
    assert conclude_cross(transient, {"verdict": "transient", "rank": 0})["verdict"] == "transient"
    assert conclude_cross(transient, {"verdict": "replay failed: x", "rank": 0})["verdict"] == "transient"
    moved = conclude_cross(transient, {"verdict": "data or numerics", "rank": 0, "forward_origin": "l0"})
    assert (moved["verdict"], moved["forward_origin"], moved["reproduced_on"]) == ("data or numerics", "l0", [0])
    own_failed = {**own, "verdict": "replay failed: KeyError: 'h'"}
    assert conclude_cross(own_failed, {"verdict": "transient", "rank": 0})["verdict"] == own_failed["verdict"]


def test_a_partner_s_replay_never_raises() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    params = list(model.parameters())

    def replay(closure: Any, rng: Any) -> dict[str, Any]:
        return attribute(closure, params, model=model, rng=rng)

    closure = ReplayClosure(lambda batch: model(batch).sum(), torch.ones(1, 2))
    batch = pickle.dumps((torch.tensor([[math.nan, 1.0]]), None))
    done = replay_batch_of(closure, batch, replay, params, rank=0, of=1)
    assert (done["verdict"], done["rank"], done["batch_of"]) == ("data or numerics", 0, 1)
    assert (done["forward_origin"], done["input_nonfinite"]) == ("Linear", True)  # the other rank's NaN, here

    class Broken(ReplayClosure):
        def on(self, batch: Any) -> ReplayClosure:
            raise KeyError("the step's state")

    for payload, bad, error in [
        (batch, Broken(closure.step, None), "KeyError: \"the step's state\""),  # the closure
        ("the batch could not be sent: TypeError: x", closure, "RuntimeError: the batch could not be sent"),
        (None, closure, "RuntimeError: no batch arrived"),
        (b"not a pickle", closure, "UnpicklingError"),
    ]:
        out = replay_batch_of(bad, payload, replay, params, rank=0, of=1)
        assert out["verdict"].startswith("replay failed: ") and error in out["verdict"]
        assert (out["rank"], out["batch_of"], out["replays"]) == (0, 1, 0)


def test_only_the_faulty_rank_s_own_cuda_generator_travels() -> None:
    cuda = [torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]  # per device, as captured
    rng = {"torch": torch.get_rng_state(), "cuda": cuda}
    closure = ReplayClosure(lambda batch: batch, torch.ones(1))
    _, sent = pickle.loads(_pack(closure, rng, torch.device("cuda", 1)))
    assert sent["cuda"] is not cuda and torch.equal(sent["cuda"], cuda[1]) and torch.equal(sent["torch"], rng["torch"])
    _, sent = pickle.loads(_pack(closure, rng, torch.device("cpu")))
    assert "cuda" not in sent and rng["cuda"] is cuda  # the kept state is untouched
    assert "cuda" not in _rng_here({"torch": rng["torch"], "cuda": cuda[1]}, torch.device("cpu"))


def test_the_message_words_each_verdict() -> None:
    own = {"verdict": "data or numerics", "rank": 1, "replays": 1, **PLACE}
    device = {**conclude_cross(own, {"verdict": "transient", "rank": 0, "replays": 2}), "faulty_ranks": [1]}
    assert describe(device) == (
        f"Replay: device (reproduces on rank 1, but not with its batch on rank 0): suspect the device of rank 1, "
        f"host {HOST}, cpu ({PLACE['device_name']})."
    )
    partner_failed = conclude_cross({**own, "verdict": "transient", "replays": 2},
                                    {"verdict": "replay failed: OSError: gone", "rank": 0})  # fmt: skip
    assert describe({**partner_failed, "faulty_ranks": [1]}) == (
        f"Replay: transient (did not reproduce in 2 replays): suspect the hardware on rank(s) 1, host {HOST}, cpu "
        f"({PLACE['device_name']}); rank 0 could not replay rank 1's batch: OSError: gone."
    )


def test_the_docs_show_what_each_scenario_prints(runs: dict[str, Any]) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs/why-did-it-break.md").read_text()
    section = page.split("## Which device? A fault on one rank (DDP)")[1].split("```text\n")[1].split("```")[0]
    lines = [x for x in section.splitlines() if not x.startswith("#")]
    here = f"host {HOST}, cpu ({PLACE['device_name']})"
    for scenario, line in zip(("device", "data", "transient", "raises"), lines, strict=True):
        assert replayed(runs, scenario)[1].endswith(" " + line.replace("host vm, cpu (x86_64)", here))
