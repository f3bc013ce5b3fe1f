"""``gradguard report``'s per-rank section (issue 31): the divergences and the replays' verdicts of a
data-parallel run by rank, host and device, the suspect devices a job script reads from ``--json``,
the ranks in the tab's events and in a webhook's alert.

The events are the guard's own: ``GradEvent`` objects whose ``extra`` is what ``core/replicas.py``
writes for a divergence and what ``core/attribution.py``'s cross-rank replay concludes (its own
``conclude_cross``, on each rank's replay), written to an event file through ``tensorboard/format.py``
and read back by the command, as a run's files are.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from lightning_gradguard.core.attribution import describe
from lightning_gradguard.core.cross_replay import conclude_cross
from lightning_gradguard.core.verdicts import DEVICE, TRANSIENT
from lightning_gradguard.events import GradEvent
from lightning_gradguard.health import ranks as per_rank_module
from lightning_gradguard.tensorboard import format as tbformat

STEPS = 20
# 4 ranks on 2 hosts, 2 devices each
PLACES = {0: ("node-a", "cuda:0"), 1: ("node-a", "cuda:1"), 2: ("node-b", "cuda:0"), 3: ("node-b", "cuda:1")}


def _devices(ranks: list[int]) -> dict[str, dict[str, str]]:
    return {str(r): {"host": PLACES[r][0], "device": PLACES[r][1], "device_name": "NVIDIA H100"} for r in ranks}


def divergence(step: int, odd: list[int], apart: list[int], majority: bool, action: str = "warned",
               layers: tuple[str, ...] = ("fc", "head"), **amended: Any) -> GradEvent:  # fmt: skip
    """A ``replica_divergence`` event as ``ReplicaCheck._event`` (and ``_amend``, for an action) write it."""
    who = ", ".join(f"rank {r} ({PLACES[r][0]}, {PLACES[r][1]})" for r in odd)
    return GradEvent("replica_divergence", step=step, layers=layers, action=action,
                     message=f"GradGuard: replicas diverged at step {step}: {who} differs from the majority.",
                     extra={"ranks": odd, "apart": apart, "majority": majority, "layers": list(layers),
                            "devices": _devices(apart), "world_size": 4, **amended})  # fmt: skip


def own_replay(rank: int, verdict: str, local_fault: bool) -> dict[str, Any]:
    """One rank's own replay of the step (``attribute``'s keys, with ``local_fault``)."""
    host, device = PLACES[rank]
    return {"verdict": verdict, "forward_origin": None, "input_nonfinite": False, "loss_finite": True, "replays": 2,
            "seconds": 0.01, "rank": rank, "host": host, "device": device, "device_name": "NVIDIA H100",
            "local_fault": local_fault}  # fmt: skip


def replayed(step: int, everyone: list[dict[str, Any]], faulty: int, partner: dict[str, Any],
             kind: str = "nonfinite") -> GradEvent:  # fmt: skip
    """A faulty step whose replay crossed ranks: ``replay_across``'s last line, on real verdicts."""
    result = {**conclude_cross(everyone[faulty], {**partner, "batch_of": faulty}),
              "faulty_ranks": [r["rank"] for r in everyone if r["local_fault"]], "ranks": everyone}  # fmt: skip
    message = f"GradGuard: non-finite gradient at step {step}."
    return GradEvent(kind, step=step, layers=("fc",), origin="fc", action="skipped",
                     message=f"{message} {describe(result)}", extra={"replay": result})  # fmt: skip


def write_run(run: Path, events: list[GradEvent]) -> None:
    """A run's event file as the guard writes it: the total norm of each step, the events, the summary."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run))
    for step in range(STEPS):
        writer.add_scalar("gradguard/total_norm", 1.0, step)
    assert tbformat.write_config(writer, {"log_every_n_steps": 1})
    for e in events:
        assert tbformat.write_events(writer, [(e, True)], e.step)
    assert tbformat.write_summary(writer, STEPS, 1)
    writer.close()


def report(run: Path, *args: str) -> tuple[int, str]:
    from lightning_gradguard.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["report", str(run), *args])
    return status, out.getvalue()


def ddp_events() -> list[GradEvent]:
    """Rank 1 diverges at step 7 (repaired from rank 0); a NaN at step 12 reproduces on rank 3 with its own
    batch, but not with that batch on rank 0 (a device verdict); a NaN at step 15 on rank 2 that no replay
    reproduces (transient)."""
    at_12 = [own_replay(0, TRANSIENT, False), own_replay(1, TRANSIENT, False), own_replay(2, TRANSIENT, False),
             own_replay(3, "data or numerics", True)]  # fmt: skip
    at_15 = [own_replay(0, TRANSIENT, False), own_replay(1, TRANSIENT, False), own_replay(2, TRANSIENT, True),
             own_replay(3, TRANSIENT, False)]  # fmt: skip
    return [
        divergence(7, [1], [0, 1, 2, 3], True, "repaired", repaired=True, source=0),
        replayed(12, at_12, 3, own_replay(0, TRANSIENT, False)),
        replayed(15, at_15, 2, own_replay(3, TRANSIENT, False)),
    ]


def test_the_verdict_words_are_the_attributions() -> None:
    # health/ranks.py restates them (the report imports no torch): the same words
    assert (per_rank_module.TRANSIENT, per_rank_module.DEVICE) == (TRANSIENT, DEVICE)
    events = ddp_events()
    assert events[1].extra["replay"]["verdict"] == "device: rank 3 (node-b, cuda:1)"
    assert events[2].extra["replay"]["verdict"] == TRANSIENT


def test_a_ddp_run_is_reported_by_rank_with_its_suspect_devices(tmp_path: Path) -> None:
    write_run(tmp_path / "ddp", ddp_events())
    status, text = report(tmp_path / "ddp")
    lines = text.splitlines()
    start = lines.index("Per rank:")
    assert lines[start : start + 11] == [
        "Per rank:",
        "  rank 0 (node-a, cuda:0):",
        "    step 12 (nonfinite): replay of rank 3's batch transient",  # the partner: rank 3's batch is fine here
        "  rank 1 (node-a, cuda:1):",
        "    step 7: apart from the majority in fc, head (repaired)",
        "  rank 2 (node-b, cuda:0):",
        "    step 15 (nonfinite): replay transient; faulty on this rank",
        "  rank 3 (node-b, cuda:1):",
        "    step 12 (nonfinite): replay device: rank 3 (node-b, cuda:1); faulty on this rank",
        "    step 15 (nonfinite): replay of rank 2's batch transient",
        "Suspect devices: rank 1 (node-a, cuda:1): diverged at step 7; rank 2 (node-b, cuda:0): transient replay "
        "at step 15; rank 3 (node-b, cuda:1): device replay at step 12",
    ]
    assert lines[start + 11].startswith("verdict: unhealthy: replicas diverged at step 7 (rank 1 (node-a, cuda:1) "
                                        "apart from the majority) in fc, head (repaired); 2 non-finite steps")
    assert status == 1


def test_the_json_names_the_suspect_devices_and_every_rank(tmp_path: Path) -> None:
    write_run(tmp_path / "ddp", ddp_events())
    status, out = report(tmp_path / "ddp", "--json")
    (run,) = json.loads(out)
    assert run["suspect_devices"] == [
        {"rank": 1, "host": "node-a", "device": "cuda:1", "evidence": [{"step": 7, "kind": "replica_divergence"}]},
        {"rank": 2, "host": "node-b", "device": "cuda:0",
         "evidence": [{"step": 15, "kind": "nonfinite", "verdict": "transient"}]},
        {"rank": 3, "host": "node-b", "device": "cuda:1",
         "evidence": [{"step": 12, "kind": "nonfinite", "verdict": "device: rank 3 (node-b, cuda:1)"}]},
    ]  # fmt: skip
    assert run["per_rank"] == {
        "0": {"host": "node-a", "device": "cuda:0", "divergences": [],
              "replays": [{"step": 12, "kind": "nonfinite", "verdict": "transient", "faulty": False, "batch_of": 3}]},
        "1": {"host": "node-a", "device": "cuda:1", "replays": [],
              "divergences": [{"step": 7, "layers": ["fc", "head"], "action": "repaired", "majority": True}]},
        "2": {"host": "node-b", "device": "cuda:0", "divergences": [],
              "replays": [{"step": 15, "kind": "nonfinite", "verdict": "transient", "faulty": True}]},
        "3": {"host": "node-b", "device": "cuda:1", "divergences": [],
              "replays": [{"step": 12, "kind": "nonfinite", "verdict": "device: rank 3 (node-b, cuda:1)",
                           "faulty": True},
                          {"step": 15, "kind": "nonfinite", "verdict": "transient", "faulty": False, "batch_of": 2}]},
    }  # fmt: skip
    (finding,) = [f for f in run["findings"] if f["kind"] == "replica_divergence"]
    assert finding["severity"] == "unhealthy" == run["severity"]
    assert finding["what"] == ("replicas diverged at step 7 (rank 1 (node-a, cuda:1) apart from the majority) in "
                               "fc, head (repaired)")  # fmt: skip
    assert status == 1


def test_a_divergence_alone_fails_the_report_and_two_replicas_suspect_no_one(tmp_path: Path) -> None:
    # two replicas: no majority tells which is wrong, so both are named and neither is suspected
    write_run(tmp_path / "two", [divergence(9, [0, 1], [0, 1], False, layers=("encoder.0",))])
    write_run(tmp_path / "clean", [])
    status, text = report(tmp_path / "two")
    lines = text.splitlines()
    start = lines.index("Per rank:")
    assert lines[start:] == [
        "Per rank:",
        "  rank 0 (node-a, cuda:0):",
        "    step 9: the replicas disagree, no majority, in encoder.0 (warned)",
        "  rank 1 (node-a, cuda:1):",
        "    step 9: the replicas disagree, no majority, in encoder.0 (warned)",
        "Suspect devices: none",
        "verdict: unhealthy: replicas diverged at step 9 (no majority: rank 0 (node-a, cuda:0), rank 1 "
        "(node-a, cuda:1) disagree) in encoder.0 (warned)",
        "  advice (replica_divergence): with two replicas no majority tells which is wrong: run the vendor's "
        "diagnostics on both devices, or train on 3 or more replicas so that a majority can name the faulty one",
    ]
    assert status == 1  # a divergence fails the report as non-finite steps do, without --fail-on
    assert report(tmp_path / "clean")[0] == 0  # the same run without it passes
    status, out = report(tmp_path / "two", "--json")
    (run,) = json.loads(out)
    assert (run["suspect_devices"], status) == ([], 1)


def test_a_single_process_run_has_no_per_rank_section(tmp_path: Path) -> None:
    # a transient NaN on one process: gather_verdicts' answer without a process group
    mine = own_replay(0, TRANSIENT, True)
    result = {**mine, "faulty_ranks": [0]}
    event = GradEvent("nonfinite", step=4, layers=("fc",), origin="fc", action="skipped",
                      message=f"GradGuard: NaN. {describe(result)}", extra={"replay": result})  # fmt: skip
    write_run(tmp_path / "one", [event])
    status, text = report(tmp_path / "one")
    assert "Per rank" not in text and "Suspect devices" not in text
    assert "  replay of step 4 (nonfinite): transient, rank(s) 0" in text.splitlines()  # as before
    status, out = report(tmp_path / "one", "--json")
    (run,) = json.loads(out)
    assert (run["per_rank"], run["suspect_devices"], status) == ({}, [], 1)


def test_the_tab_lists_the_events_with_their_ranks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.tensorboard.eventfile import read_run
    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    write_run(tmp_path / "ddp", [*ddp_events(), GradEvent("spike", step=18, value=7.0, message="spike")])
    data = read_run(tmp_path / "ddp")
    plugin = GradGuardPlugin(base_plugin.TBContext(data_provider=None))
    monkeypatch.setattr(plugin, "read", lambda ctx, eid, run: data)
    served = plugin.events(None, "", "ddp")
    assert [(e["kind"], e["step"], e.get("ranks")) for e in served] == [
        ("replica_divergence", 7, [1]), ("nonfinite", 12, [3]), ("nonfinite", 15, [2]), ("spike", 18, None),
    ]  # fmt: skip
    assert "ranks" not in data.events[0]  # the run's data is left as read


def test_a_webhook_alert_carries_the_host_and_device(tmp_path: Path) -> None:
    from lightning_gradguard.notify.webhook import WebhookAlert
    from tests.notify.test_notify import Hook

    events = ddp_events()
    with Hook().running() as hook:
        alert = WebhookAlert(hook.url, close_timeout=120.0)
        for e in events:
            alert.on_alert(e, e.message, "ddp/0")
        alert.on_alert(GradEvent("spike", step=18, value=7.0, message="spike"), "spike", "ddp/0")
        alert.close()
    assert [p["event"].get("ranks") for p in hook.posts] == [
        [{"rank": 1, "host": "node-a", "device": "cuda:1"}],
        [{"rank": 3, "host": "node-b", "device": "cuda:1"}],
        [{"rank": 2, "host": "node-b", "device": "cuda:0"}],
        None,  # an event that names no rank: the body as before
    ]
    assert "rank 1 (node-a, cuda:1)" in hook.posts[0]["text"]
    assert "host node-b, cuda:0" in hook.posts[2]["text"]  # the replay's words, in the message


def test_named_ranks_prefers_a_device_suspect_to_the_faulty_ranks() -> None:
    event = ddp_events()[1].as_dict()
    event["extra"] = {"replay": {**event["extra"]["replay"], "faulty_ranks": [2, 3]}}
    assert per_rank_module.named_ranks(event) == [{"rank": 3, "host": "node-b", "device": "cuda:1"}]
    # a transient verdict names its faulty ranks, each with its host and device from its own replay
    assert per_rank_module.named_ranks(ddp_events()[2].as_dict()) == [{"rank": 2, "host": "node-b", "device": "cuda:0"}]
