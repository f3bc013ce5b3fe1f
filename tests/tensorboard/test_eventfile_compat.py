"""Event files written by earlier versions still read, in ``gradguard report`` and in the tab.

The fixtures (``tests/data/events-<label>/``) were written by ``tests/data/make_event_files.py``
under 0.2.0 and under the flat package just before the split into subpackages; beside each lies what
the code of that time said of it (``.report.json``: ``gradguard report --json``; ``.tab.json``: the
tab's routes). Today's code must read the same data from them. The judgement (verdict, severity,
findings, layer flags) changed once, on purpose, where the old rules were wrong (the CHANGELOG lists
it): today's judgement is in ``.verdict.json``. Record it and the tab's routes again with
``python -m tests.tensorboard.test_eventfile_compat`` only when a change of verdict is meant, and
list it in the CHANGELOG.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import get_json, tensorboard_server

DATA = Path(__file__).resolve().parents[1] / "data"
LABELS = ("0.2.0", "pre-split")
ROUTES = ("layers", "timesteps", "events", "report")


def _cli_report(logdir: Path) -> tuple[int, Any]:
    from lightning_gradguard.cli import main as report_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = report_main(["report", str(logdir), "--json"])
    report = json.loads(out.getvalue())
    for run in report:
        run["run"] = Path(run["run"]).name
    return status, report


def _expected(label: str, kind: str) -> Any:
    return json.loads((DATA / f"events-{label}.{kind}.json").read_text())


JUDGEMENT = ("verdict", "severity", "findings", "notes", "events_from", "event_count", "vanish_threshold", "replays",
             "rollbacks", "skipped_batches", "logged_steps")  # fmt: skip


def _split(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what was read, what was judged) of one run's report."""
    read = {k: v for k, v in run.items() if k not in JUDGEMENT}
    read["layers"] = {name: {k: v for k, v in row.items() if k != "flags"} for name, row in run["layers"].items()}
    judged = {k: run[k] for k in JUDGEMENT if k in run}
    judged["flags"] = {name: row["flags"] for name, row in run["layers"].items()}
    return read, judged


@pytest.mark.parametrize("label", LABELS)
def test_the_cli_reads_an_older_event_file_as_it_did(label: str) -> None:
    expected = _expected(label, "report")
    status, report = _cli_report(DATA / f"events-{label}")
    assert status == expected["status"]
    (then,) = expected["report"]
    (now,) = report
    assert _split(now)[0] == _split(then)[0]  # every number read, as it was read then
    assert _split(now)[1] == _expected(label, "verdict")  # the judgement of today's rules


@contextlib.contextmanager
def _served(root: Path) -> Iterator[str]:
    for label in LABELS:
        shutil.copytree(DATA / f"events-{label}" / "run", root / label)

    def ready(base: str) -> bool:
        api = f"{base}/data/plugin/gradguard"
        return bool(sorted(get_json(f"{api}/runs")) == sorted(LABELS) and get_json(f"{api}/report?run=pre-split"))

    with tensorboard_server(root, ready) as base:
        yield f"{base}/data/plugin/gradguard"


def _routes(api: str, label: str) -> dict[str, Any]:
    out = {route: get_json(f"{api}/{route}?run={label}") for route in ROUTES}
    out["report"].pop("run", None)
    return out


# the steps the heatmap draws as skipped (a key the layers route gained after the recording): the
# skipped steps of the events the run recorded, none for 0.2.0, which recorded no event
SKIPPED = {"0.2.0": {}, "pre-split": {5: "non-finite", 9: "non-finite"}}


def test_the_tab_reads_older_event_files_as_it_did(tmp_path: Path) -> None:
    with _served(tmp_path) as api:
        for label in LABELS:
            now, then = _routes(api, label), _expected(label, "tab")
            skipped = now["layers"].pop("skipped")
            then["layers"].pop("skipped", None)
            assert now == then, label
            assert {s: why for s, why in zip(now["layers"]["steps"], skipped, strict=True) if why} == SKIPPED[label]


def _record() -> None:  # pragma: no cover - run by hand
    import tempfile

    for label in LABELS:
        (now,) = _cli_report(DATA / f"events-{label}")[1]
        (DATA / f"events-{label}.verdict.json").write_text(json.dumps(_split(now)[1], indent=1, sort_keys=True))
    with tempfile.TemporaryDirectory() as tmp, _served(Path(tmp)) as api:
        for label in LABELS:
            (DATA / f"events-{label}.tab.json").write_text(json.dumps(_routes(api, label), indent=1, sort_keys=True))
    print("recorded", file=sys.stderr)


if __name__ == "__main__":
    _record()
