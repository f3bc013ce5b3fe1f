"""The GradGuard tab in TensorBoard, its data, and the images of recurrent models."""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from lightning_gradguard import GradGuard, GradGuardWarning, NormClip
from lightning_gradguard.cli import main as report_main
from lightning_gradguard.health.judge import judge_run
from lightning_gradguard.tensorboard.eventfile import read_run
from tests.browser import browser_or_skip
from tests.helpers import get_json, tensorboard_server, trainer
from tests.tensorboard.test_dashboard import SeqNet


def fit_seqnet(logdir: Path, name: str, steps: int, nan_step: int | None = None, **kw: Any) -> GradGuard:
    guard = GradGuard(clip=NormClip(0.5), log_every_n_steps=1, **kw)
    logger = TensorBoardLogger(logdir, name=name, version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=steps, logger=logger, log_every_n_steps=1).fit(SeqNet(nan_step))
    return guard


def image_steps(run: Path) -> dict[str, list[int]]:
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_an_lstm_run_logging_every_step_has_both_images(tmp_path: Path) -> None:
    guard = fit_seqnet(tmp_path, "lstm", steps=12)  # images drawn in the background, within the budget
    steps = image_steps(tmp_path / "lstm")
    assert set(steps) == {"gradguard/flow", "gradguard/timestep/rnn"}
    # one render job per logging step: a step drawn has both images; the last step is always drawn
    assert steps["gradguard/flow"] == steps["gradguard/timestep/rnn"]
    assert steps["gradguard/flow"][-1] == 11 and steps["gradguard/flow"][0] == 0
    assert guard.sink.renderer.rendered == len(steps["gradguard/flow"])


def test_images_false_draws_no_image_but_logs_the_data(tmp_path: Path) -> None:
    guard = fit_seqnet(tmp_path, "noimg", steps=4, images=False)
    assert image_steps(tmp_path / "noimg") == {}
    assert guard.sink.renderer.rendered == 0 and guard.last_report is not None and guard.last_report.metrics


# --------------------------------------------------------------------------- the tab, served for real
NAN_STEP = 5


@pytest.fixture(scope="module")
def tab_logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradGuard]:
    root = tmp_path_factory.mktemp("tab")
    guard = fit_seqnet(root, "faulty", steps=12, nan_step=NAN_STEP, images=False, track_updates=True)
    return root, guard


@pytest.fixture(scope="module")
def server(tab_logs: tuple[Path, GradGuard]) -> Iterator[str]:
    root, _ = tab_logs

    def ready(base: str) -> bool:  # the run and its events are loaded
        api = f"{base}/data/plugin/gradguard"
        return bool(_get(f"{api}/runs") == ["faulty"] and _get(f"{api}/events?run=faulty"))

    with tensorboard_server(root, ready) as base:
        yield base


_get = get_json


def test_the_tab_is_listed_enabled_and_its_module_is_served(server: str) -> None:
    listing = _get(f"{server}/data/plugins_listing")["gradguard"]
    assert listing["enabled"] is True and listing["tab_name"] == "GradGuard"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/gradguard/static/tab.js"}
    with urllib.request.urlopen(f"{server}/data/plugin/gradguard/static/tab.js", timeout=10) as resp:
        assert "javascript" in resp.headers["Content-Type"]
        source = resp.read().decode()
    assert "export async function render()" in source
    assert "http" not in source.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from outside


def test_the_routes_return_what_the_run_logged(server: str, tab_logs: tuple[Path, GradGuard]) -> None:
    root, guard = tab_logs
    acc = EventAccumulator(str(root / "faulty"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    api = f"{server}/data/plugin/gradguard"
    layers = _get(f"{api}/layers?run=faulty")
    assert layers["layers"] == ["embed", "rnn.l0", "head"]  # forward order
    assert layers["steps"] == list(range(12))
    for name, row in zip(layers["layers"], layers["log10"], strict=True):
        logged = {e.step: e.value for e in acc.Scalars(f"gradguard/layer/{name}")}
        for step, value in zip(layers["steps"], row, strict=True):
            if math.isfinite(logged[step]) and logged[step] > 0:
                assert value == pytest.approx(math.log10(logged[step]), rel=1e-12, abs=1e-12)
            else:
                assert value is None
    assert layers["nonfinite_steps"] == [NAN_STEP]
    assert layers["skipped"] == [("non-finite" if s == NAN_STEP else None) for s in layers["steps"]]
    assert layers["vanish_threshold"] == pytest.approx(1e-8) and layers["explode_threshold"] is None

    updates = _get(f"{api}/updates?run=faulty")  # track_updates: the update-to-weight ratios, same matrix
    assert updates["layers"] == ["embed", "rnn.l0", "head"] and updates["steps"] == list(range(1, 12))
    for name, row in zip(updates["layers"], updates["log10"], strict=True):
        logged = {e.step: e.value for e in acc.Scalars(f"gradguard/update_ratio/{name}")}
        for step, value in zip(updates["steps"], row, strict=True):
            if logged[step] > 0:
                assert value == pytest.approx(math.log10(logged[step]), rel=1e-12, abs=1e-12)
            else:
                assert value is None  # the skipped step's update: zero
    assert updates["vanish_threshold"] is None
    # the update logged at step N is step N - 1's: the skipped step's is the column after it, and it is
    # skipped, not non-finite (the gradients were, the update was not made)
    assert updates["skipped"] == [("non-finite" if s == NAN_STEP + 1 else None) for s in updates["steps"]]
    assert updates["nonfinite_steps"] == []

    seq = _get(f"{api}/timesteps?run=faulty")["sequences"]["rnn"]
    profiles = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors("gradguard/profile/rnn")}
    assert seq["steps"] == sorted(profiles) == list(range(12))  # > 10: every sample is kept
    for step, row in zip(seq["steps"], seq["log10"], strict=True):
        expected = [math.log10(v) if math.isfinite(v) and v > 0 else None for v in profiles[step].tolist()]
        assert [v is None for v in row] == [v is None for v in expected]
        assert [v for v in row if v is not None] == pytest.approx([v for v in expected if v is not None], rel=1e-12)
    assert seq["horizon"][-1] == guard.core.timestep_summaries["rnn"]["horizon"]
    torch.testing.assert_close(torch.tensor(profiles[11]), guard.timestep_norms["rnn"], rtol=0, atol=0)

    events = _get(f"{api}/events?run=faulty")
    assert [(e["kind"], e["step"], e["origin"], e["layers"], e["message"]) for e in events] == [
        (e.kind, e.step, e.origin, list(e.layers), e.message) for e in guard.events
    ]
    report = _get(f"{api}/report?run=faulty")
    code = report_main(["report", str(root / "faulty"), "--json"])
    assert code == 1
    assert report["healthy"] is False and "1 non-finite step (1 skipped)" in report["verdict"]


def test_the_tab_gives_the_verdict_of_gradguard_report(
    tab_logs: tuple[Path, GradGuard], capsys: Any, server: str
) -> None:
    root, _ = tab_logs
    report_main(["report", str(root / "faulty"), "--json"])
    (cli,) = json.loads(capsys.readouterr().out)
    tab = _get(f"{server}/data/plugin/gradguard/report?run=faulty")
    assert tab["verdict"] == cli["verdict"] and tab["findings"] == cli["findings"]


def test_a_logdir_without_guard_data_has_no_enabled_tab(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="plain", version="")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    plugin = _plugin_for(tmp_path)
    assert plugin.is_active() is False
    plugin_with = _plugin_for(tmp_path, guarded=True)
    assert plugin_with.is_active() is True


def _plugin_for(logdir: Path, guarded: bool = False) -> Any:
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    if guarded:
        fit_seqnet(logdir, "guarded", steps=2, images=False)
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradguard": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    return GradGuardPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(logdir)))


def test_a_rollback_event_carries_its_batches_as_the_report_prints_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.cli import render_text
    from lightning_gradguard.health.judge import RunData
    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    def rollback(step: int, **extra: Any) -> dict[str, Any]:
        return {"kind": "rollback", "step": step, "action": "rolled back", "message": "m",
                "extra": {"cause": "c", "snapshot_step": 0, **extra}}  # fmt: skip

    events = [
        rollback(20, batches_skipped=[[0, b] for b in range(21)] + [[0, b] for b in range(17)]),  # the version before
        rollback(40, batch_ranges=[[0, 21, 40]], batch_count=20),
        rollback(50),  # no batch named
    ]
    data = RunData(scalars={"gradguard/total_norm": [(0, 1.0)]}, events=events, recorded_events=True)
    plugin = GradGuardPlugin(base_plugin.TBContext(data_provider=None))
    monkeypatch.setattr(plugin, "read", lambda ctx, eid, run: data)
    served = plugin.events(None, "", "run")
    assert [e.get("batches") for e in served] == ["0:0–0:20 (21 batches)", "0:21–0:40 (20 batches)", None]
    report = render_text(judge_run("run", data))
    assert all(f"    batches undone: {e['batches']}\n" in report for e in served[:2])  # the same words
    assert data.events == events and "batches" not in events[0]  # the run's data is left as read


def test_a_binned_update_heatmap_leaves_the_skipped_steps_zero_updates_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.health.judge import RunData
    from lightning_gradguard.tensorboard.heatmap import MAX_COLUMNS
    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    skipped = {99, 100, 101, 199}  # the update of step s is logged at step s + 1: zero
    ratios = [(s, 0.0 if s - 1 in skipped else 0.01 + s * 1e-5) for s in range(1, 701)]  # 700 columns: binned by 3
    events = [{"kind": "nonfinite", "step": s, "action": "skipped", "message": "m"} for s in sorted(skipped)]
    data = RunData(scalars={"gradguard/update_ratio/l0": ratios}, events=events, recorded_events=True)
    plugin = GradGuardPlugin(base_plugin.TBContext(data_provider=None))
    monkeypatch.setattr(plugin, "read", lambda ctx, eid, run: data)
    out = plugin.updates(None, "", "run")
    assert len(out["steps"]) == 700 // 3 + 1 <= MAX_COLUMNS
    by_bin = {tuple(b): (norm, why) for b, norm, why in zip(out["bins"], out["norms"][0], out["skipped"], strict=True)}
    assert by_bin[(100, 102)] == (None, "non-finite")  # every step of the bin skipped: drawn as skipped
    assert by_bin[(199, 201)] == (0.01 + 199 * 1e-5, None)  # one of three: the worst of the other two, not 0
    assert [why for why in out["skipped"] if why] == ["non-finite"] and out["nonfinite_steps"] == []
    assert 0.0 not in out["norms"][0]  # no bin shows a skipped step's zero as a dead layer's


def test_report_still_reads_profiles_written_as_text_by_0_2_0(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "old"))
    for step in (9, 19):
        writer.add_scalar("gradguard/total_norm", 1.0, step)
        writer.add_scalar("gradguard/layer/rnn.l0", 0.5, step)
        writer.add_text("gradguard/timestep_profile/rnn", json.dumps([step / 1000, 0.5, 1.0]), step)
    writer.close()
    data = read_run(tmp_path / "old")
    assert data.profiles["rnn"] == [(9, [0.009, 0.5, 1.0]), (19, [0.019, 0.5, 1.0])]
    assert judge_run("old", data).profiles["rnn"] == [0.019, 0.5, 1.0]


# ------------------------------------------------------------------------------ a real browser
@pytest.mark.browser
def test_the_tab_renders_in_headless_chromium(server: str, tmp_path: Path) -> None:
    # Chromium or Chrome already on PATH; a test never installs one (tests/browser.py says why). Where
    # one is on PATH and this test skips anyway, tests/conftest.py fails the session.
    binary = browser_or_skip()
    url = f"{server}/data/plugin_entry.html?name=gradguard&run=faulty"
    proc = subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = proc.stdout
    assert 'data-gg-ready="1"' in dom, proc.stderr[-2000:]
    flow, updates = dom.split('id="gg-updates"', 1)
    assert 'id="gg-updates-map"' in updates  # the update-ratio heatmap, beside the gradient flow
    rows = re.findall(r'<g class="gg-row" data-layer="([^"]+)"', flow)
    assert rows == ["embed", "rnn.l0", "head"]  # one heatmap row per layer, in forward order
    assert len(re.findall(r'class="gg-cell"', dom)) >= 3 * 12
    events = re.findall(r'<tr class="gg-event" data-step="(\d+)" data-kind="(\w+)"', dom)
    assert events == [(str(NAN_STEP), "nonfinite")]
    assert 'class="gg-verdict unhealthy"' in dom
    assert 'class="gg-timestep-map" data-sequence="rnn"' in dom and 'class="gg-horizon"' in dom
    assert f'data-step="{NAN_STEP}"' in dom.split('id="gg-flow-map"', 1)[1]  # the NaN step marked on the map
    # the skipped step in its own colour and class in both heatmaps, never "zero (dead)"; in the gradient
    # flow its cells keep the non-finite colour (where the fault was), in the updates the skipped one
    flow_map, updates_map = flow.split('id="gg-flow-map"', 1)[1], updates.split('id="gg-updates-map"', 1)[1]

    def skipped_cells(svg: str) -> list[str]:
        return re.findall(r'<rect [^>]*class="gg-cell gg-skipped"[^>]*>', svg.split("</svg>", 1)[0])

    assert len(skipped_cells(flow_map)) == 3 and all(
        f"· step {NAN_STEP} · ‖g‖ = non-finite · step skipped (non-finite)" in c and 'fill="#d62728"' in c
        for c in skipped_cells(flow_map)
    )
    assert len(skipped_cells(updates_map)) == 3 and all(
        f"· step {NAN_STEP + 1} · ‖ΔW‖/‖W‖ = 0 · the update of step {NAN_STEP} skipped (non-finite)" in c
        and 'fill="#c5b0d5"' in c
        for c in skipped_cells(updates_map)
    )
    assert "gg-zero" not in updates_map and "zero gradient (dead)" not in updates  # the only zero: the skipped
    for section in (flow, updates):  # the legend of each heatmap names the colour
        assert '<span class="gg-swatch" style="background: #c5b0d5"></span>skipped</span>' in section


def test_a_local_logdir_and_the_data_provider_give_the_tab_the_same_data(tab_logs: tuple[Path, GradGuard]) -> None:
    """A local logdir is read from its files; a remote one (no local folder) through the data provider."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    root, _ = tab_logs
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradguard": 0, "text": 0})
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(root))
    local = GradGuardPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(root)))
    remote = GradGuardPlugin(base_plugin.TBContext(data_provider=provider, logdir="gs://bucket/runs"))
    assert local._logdir is not None and remote._logdir is None
    ctx = context.RequestContext()
    from lightning_gradguard.tensorboard.format import json_safe

    for route in ("layers", "timesteps", "report"):  # as served: NaN as null
        served = [json.dumps(json_safe(getattr(p, route)(ctx, "", "faulty"))) for p in (local, remote)]
        assert served[0] == served[1], route
    assert local.read(ctx, "", "faulty").events == remote.read(ctx, "", "faulty").events
