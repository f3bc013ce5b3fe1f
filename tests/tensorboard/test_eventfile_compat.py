"""Event files written by earlier versions still read, in ``gradguard report`` and in the tab.

The fixtures (``tests/data/events-<label>/``) were written by ``tests/data/make_event_files.py``
under 0.2.0 and under the flat package just before the split into subpackages; beside each lies what
``gradguard report --json`` of that version said of it (``.report.json``). Today's code must read the
same numbers from them, in the report and in the tab's routes.

The judgement (verdict, severity, findings, layer flags) changed once, on purpose, where the old rules
were wrong (the CHANGELOG lists it). What it must be now is written here by hand (``EXPECTED``), from
the run's own data, each expectation with the reason a person gives for it; nothing the code under test
wrote is compared with. ``test_the_fixtures_hold_what_the_expectations_rest_on`` checks those reasons
on the event files, read with TensorBoard's own reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import get_json, tensorboard_server

DATA = Path(__file__).resolve().parents[1] / "data"
LABELS = ("0.2.0", "pre-split")


def _cli_report(logdir: Path) -> tuple[int, Any]:
    from lightning_gradguard.cli import main as report_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = report_main(["report", str(logdir), "--json"])
    report = json.loads(out.getvalue())
    for run in report:
        run["run"] = Path(run["run"]).name
    return status, report


def _then(label: str) -> dict[str, Any]:
    """What ``gradguard report --json`` of the version that wrote the fixture said of it."""
    return json.loads((DATA / f"events-{label}.report.json").read_text())  # type: ignore[no-any-return]


def _logged(label: str) -> dict[str, list[tuple[int, float]]]:
    """The fixture's scalars, read with TensorBoard's own reader (not the code under test)."""
    acc = EventAccumulator(str(DATA / f"events-{label}" / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


JUDGEMENT = ("verdict", "severity", "findings", "notes", "events_from", "event_count", "vanish_threshold", "replays",
             "rollbacks", "skipped_batches", "logged_steps", "per_rank", "suspect_devices")  # fmt: skip


def _split(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what was read, what was judged) of one run's report."""
    read = {k: v for k, v in run.items() if k not in JUDGEMENT}
    read["layers"] = {name: {k: v for k, v in row.items() if k != "flags"} for name, row in run["layers"].items()}
    judged = {k: run[k] for k in JUDGEMENT if k in run}
    judged["flags"] = {name: row["flags"] for name, row in run["layers"].items()}
    return read, judged


# ------------------------------------------------------------------------------ what a person expects
# The run (tests/data/make_event_files.py, the same under both versions): embed -> LSTM (rnn.l0) -> head,
# Adam, NormClip(max_norm=0.05), 16 steps, every step logged; head's output gradient made NaN on step 5,
# the loss made NaN on step 9, embed's gradient scaled by 1e-12. `test_the_fixtures_hold_...` checks each
# fact about the data that a reason below names.
EXPECTED: dict[str, Any] = {
    # Non-finite steps, and a vanishing layer, are each `unhealthy` (README, "Severity").
    "severity": "unhealthy",
    # (kind, severity, layers), in the report's order (non-finite steps first). Steps 5 and 9 logged a NaN
    # total norm and were skipped: one `nonfinite` finding. embed's norm is below vanish_threshold 1e-8 at
    # every finite logged step (at most 2.7e-13): `vanishing`, in embed only (rnn.l0's and head's norms are
    # 0.13 or more). Nothing else: the run set no explode_threshold (no `exploding`; a NaN loss is never
    # one, and step 5's NaN follows no spike), its 14 finite steps are fewer than spike_warmup=50 (no
    # `spiky`), no norm is exactly zero (no `dead`), every layer got a gradient (no `unused`), and the
    # first/last timestep ratio stays in [1.2e-3, 5.1e-3], inside [1e-4, 1e4] (nothing through time).
    "findings": [("nonfinite", "unhealthy", None), ("vanishing", "unhealthy", ["embed"])],
    # the vanishing finding's layers, flagged in the table; nothing else is flagged
    "flags": {"embed": ["vanishing"], "rnn.l0": [], "head": []},
    # the two non-finite steps, skipped (the guard's default on_nonfinite="skip"; the run logged both as
    # skipped); no rollback was configured, no replay recorded (neither version had one)
    "skipped_batches": [{"step": 5, "reason": "nonfinite"}, {"step": 9, "reason": "nonfinite"}],
    "rollbacks": [],
    "replays": [],
    # one process: no event names a rank (no replica check, no replay), so nothing per rank, no suspect
    "per_rank": {},
    "suspect_devices": [],
    "logged_steps": 16,  # log_every_n_steps=1 over 16 steps
    # 0.2.0 recorded no threshold: the guard's default, 1e-8; the pre-split run recorded 1e-8
    "vanish_threshold": 1e-8,
    # the vanishing of embed (the layer-health detector names a layer once) and the two non-finite steps
    "event_count": 3,
    # 0.2.0 recorded no events: its logged steps are replayed through the detectors; pre-split recorded them
    "events_from": {"0.2.0": "replayed", "pre-split": "recorded"},
    # key phrases of the findings' texts, by kind: (in `what`, in `advice`, never in `advice`)
    "phrases": {
        # origins as the run recorded them: step 5 began in head, step 9's loss was NaN; a NaN loss is a
        # forward-pass fault, for which clipping is never the advice
        "nonfinite": (
            [
                "2 non-finite steps (2 skipped)",
                "the loss was non-finite at step 9",
                "not a gradient explosion",
                "non-finite gradients at step 5, beginning in head",
            ],
            ["clipping gradients cannot cure it", "replay the first one"],
            ["NormClip(", "ZClip("],
        ),
        "vanishing": (["vanishing gradients in embed"], ["initialisation"], ["NormClip("]),
    },
    # One note: the clipper at work. Every finite total norm (0.257 or more) is above max_norm=0.05, so it
    # clipped each of the 14 finite steps, 14 of the 16 logged (88%); the 14 finite total norms have median
    # 0.545, 99th percentile 1.76, max 1.86. Neither file names the clipper: "a clipper". No "large
    # gradients early" note: the last quarter's median is 0.53 of the first's, not below 0.1.
    "notes": [
        "a clipper clipped 88% of the logged steps (the total norm's median over 14 logged steps is 0.545, "
        "its 99th percentile 1.76, its max 1.86)"
    ],
}


def _check_judgement(label: str, judged: dict[str, Any]) -> None:
    """``judged``: the report's judgement (``_split``'s), or the tab's report route (its own keys)."""
    findings = judged["findings"]
    assert judged["severity"] == EXPECTED["severity"]
    assert [(f["kind"], f["severity"], f.get("layers")) for f in findings] == EXPECTED["findings"]
    for f in findings:
        what, advice, never = EXPECTED["phrases"][f["kind"]]
        assert all(p in f["what"] for p in what), f["what"]
        assert all(p in f["advice"] for p in advice) and not any(p in f["advice"] for p in never), f["advice"]
    assert judged["notes"] == EXPECTED["notes"]
    assert judged["events_from"] == EXPECTED["events_from"][label]
    # the verdict: the severity, then what each finding found, in order; the 0.2.0 report's "exploding
    # gradients in embed, head, rnn.l0" was wrong (no threshold was crossed) and is gone
    assert judged["verdict"] == "unhealthy: " + "; ".join(f["what"] for f in findings)
    assert "exploding" not in judged["verdict"]


def test_the_fixtures_hold_what_the_expectations_rest_on() -> None:
    for label in LABELS:
        logged = _logged(label)
        layers = {tag.rsplit("/", 1)[1]: [v for _, v in s] for tag, s in logged.items() if "/layer/" in tag}
        totals = [v for _, v in logged["gradguard/total_norm"]]
        finite = [v for v in totals if math.isfinite(v)]
        assert [s for s, _ in logged["gradguard/total_norm"]] == list(range(16)), label  # every step logged
        assert [s for s, v in enumerate(totals) if not math.isfinite(v)] == [5, 9]
        assert max(v for v in layers["embed"] if math.isfinite(v)) < 3e-13
        assert min(v for n in ("rnn.l0", "head") for v in layers[n] if math.isfinite(v)) > 0.13
        assert 0 not in [v for values in layers.values() for v in values]
        assert min(finite) > 0.05 and len(finite) == 14 < 50
        ratios = [v for _, v in logged["gradguard/timestep/rnn/first_last_ratio"] if math.isfinite(v)]
        assert min(ratios) > 1.2e-3 and max(ratios) < 5.1e-3
        assert statistics.fmean(v for _, v in logged["gradguard/clipped_fraction"]) == 14 / 16
        spread = (np.median(finite), np.percentile(finite, 99), max(finite))
        assert [f"{v:.3g}" for v in spread] == ["0.545", "1.76", "1.86"]
        assert statistics.median(finite[-3:]) / statistics.median(finite[:3]) > 0.1  # quarters of 14 finite steps


@pytest.mark.parametrize("label", LABELS)
def test_the_cli_reads_an_older_event_file_as_it_did(label: str) -> None:
    then = _then(label)
    status, report = _cli_report(DATA / f"events-{label}")
    assert status == then["status"] == 1  # non-finite steps: exit status 1, then and now
    (old,) = then["report"]
    (now,) = report
    assert _split(now)[0] == _split(old)[0]  # every number read, as it was read then


@pytest.mark.parametrize("label", LABELS)
def test_the_cli_judges_an_older_event_file_as_a_person_does(label: str) -> None:
    (now,) = _cli_report(DATA / f"events-{label}")[1]
    judged = _split(now)[1]
    assert set(judged) == {*JUDGEMENT, "flags"}  # a new key of the judgement needs an expectation here
    _check_judgement(label, judged)
    for key in ("flags", "skipped_batches", "rollbacks", "replays", "logged_steps", "vanish_threshold", "event_count",
                "per_rank", "suspect_devices"):  # fmt: skip
        assert judged[key] == EXPECTED[key], key


# ------------------------------------------------------------------------------ the tab
@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("served")
    for label in LABELS:
        shutil.copytree(DATA / f"events-{label}" / "run", root / label)

    def ready(base: str) -> bool:
        api = f"{base}/data/plugin/gradguard"
        return bool(sorted(get_json(f"{api}/runs")) == sorted(LABELS) and get_json(f"{api}/report?run=pre-split"))

    with tensorboard_server(root, ready) as base:
        yield f"{base}/data/plugin/gradguard"


def _route(api: str, route: str, label: str) -> Any:
    return get_json(f"{api}/{route}?run={label}")


def _log10(v: float | None) -> float | None:
    return None if v is None or not v > 0 else math.log10(v)


@pytest.mark.parametrize("label", LABELS)
def test_the_tab_serves_the_numbers_the_old_report_read(api: str, label: str) -> None:
    (old,) = _then(label)["report"]
    layers = _route(api, "layers", label)
    assert layers["layers"] == old["layer_order"]  # forward order
    assert layers["steps"] == list(range(old["steps"]))  # every step was logged
    assert layers["bins"] == [[s, s] for s in layers["steps"]] and layers["groups"] == []  # too few to bin or group
    assert layers["nonfinite_steps"] == [row["step"] for row in old["nonfinite"]]
    assert layers["explode_threshold"] is None  # the run set none
    for name, norms in zip(layers["layers"], layers["norms"], strict=True):
        assert [s for s, v in zip(layers["steps"], norms, strict=True) if v is None] == [5, 9]  # NaN: null
        # the median of the same 14 float32 values, perhaps averaged in another order: equal within rounding
        finite = [v for v in norms if v is not None]
        assert statistics.median(finite) == pytest.approx(old["layers"][name]["median"], rel=1e-12, abs=0)
        assert (max(finite), norms[-1]) == (old["layers"][name]["max"], old["layers"][name]["last"])
    assert layers["log10"] == [[_log10(v) for v in row] for row in layers["norms"]]
    sequences = _route(api, "timesteps", label)["sequences"]
    assert list(sequences) == list(old["profiles"]) == ["rnn"]
    rnn = sequences["rnn"]
    assert rnn["steps"] == list(range(old["steps"])) and rnn["length"] == len(old["profiles"]["rnn"]) == 12
    assert rnn["log10"][-1] == [math.log10(v) for v in old["profiles"]["rnn"]]  # the last profile, as read then
    assert [s for s, row in enumerate(rnn["log10"]) if set(row) == {None}] == [5, 9]  # NaN steps: no profile
    # each step's horizon as the live guard logged it, the last one as the old report printed it
    assert rnn["horizon"] == [v for _, v in _logged(label)["gradguard/timestep/rnn/horizon"]]
    assert rnn["horizon"][-1] == old["timesteps"]["rnn"]["horizon"] == 7
    report = _route(api, "report", label)
    counts = (report["nonfinite_steps"], report["skipped_steps"])
    assert counts == (old["nonfinite_steps"], old["skipped_steps"]) == (2, 2)


@pytest.mark.parametrize("label", LABELS)
def test_the_tab_judges_an_older_event_file_as_a_person_does(api: str, label: str) -> None:
    report = _route(api, "report", label)
    _check_judgement(label, report)
    assert report["healthy"] is False and report["events"] == EXPECTED["event_count"]
    layers = _route(api, "layers", label)
    if label == "pre-split":  # the steps drawn as skipped, and the threshold drawn in the legend
        assert dict(zip(layers["steps"], layers["skipped"], strict=True)) == {
            s: "non-finite" if s in (5, 9) else None for s in range(16)
        }
        assert layers["vanish_threshold"] == EXPECTED["vanish_threshold"]
    # the events the verdict was built from: pre-split recorded embed's vanishing (below 1e-8 on 2
    # logging steps, its vanish_patience, so at step 1) and the two non-finite steps with their origins;
    # 0.2.0 recorded none, so the tab shows what the report judged: the guard's detectors replayed on
    # its logged steps (the default vanish_patience, 3, puts the vanishing at step 2), marked replayed
    served = _route(api, "events", label)
    events = [(e["kind"], e["step"], e["origin"], e["layers"], e["action"]) for e in served]
    every = ["embed", "rnn.l0", "head"]
    assert events == [("vanishing", 1 if label == "pre-split" else 2, None, ["embed"], "none"),
                      ("nonfinite", 5, "head", every, "skipped"),
                      ("nonfinite", 9, "loss", every, "skipped")]  # fmt: skip
    assert [e.get("replayed", False) for e in served] == [label == "0.2.0"] * 3
    assert len(served) == EXPECTED["event_count"]  # the events the tab lists are those the verdict counts


def test_the_tab_draws_0_2_0_s_skipped_steps_as_skipped(api: str) -> None:
    # 0.2.0 logged both non-finite steps with "action skipped" (gradguard/nonfinite), and the report of the
    # same data lists them as skipped (skipped_batches): the heatmap should draw them so, as for pre-split
    layers = _route(api, "layers", "0.2.0")
    assert dict(zip(layers["steps"], layers["skipped"], strict=True)) == {
        s: "non-finite" if s in (5, 9) else None for s in range(16)
    }


def test_the_tab_draws_0_2_0_s_vanishing_layer_against_the_threshold_it_was_judged_by(api: str) -> None:
    # the legend and the colours of layers below vanish_threshold need the threshold the verdict used
    assert _route(api, "layers", "0.2.0")["vanish_threshold"] == EXPECTED["vanish_threshold"]
