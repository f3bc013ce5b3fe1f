"""The GradGuard tab in TensorBoard: a dynamic plugin, drawn in the browser from the logged data.

``pip install lightning-gradguard`` registers it through the ``tensorboard_plugins`` entry point,
so ``tensorboard --logdir runs`` shows a **GradGuard** tab for every logdir that holds guard data.
The frontend is one ES module of plain JavaScript (``static/tab.js``): no build step, no network.

JSON routes, under ``/data/plugin/gradguard/`` (each ``?run=<name>`` but ``runs``):

==================  ==========================================================================
``runs``            the runs that hold guard data
``layers``          layers in forward order x logging steps: log10 of each layer's norm (null
                    where it is not positive and finite), the raw norms, the non-finite steps,
                    the skipped ones (``skipped``: why, per column, or null) and the thresholds
``updates``         the same for the update-to-weight ratios (``track_updates``; empty without);
                    a column is skipped when the update it measured (the previous step's) was
``timesteps``       each tracked sequence: logging steps x timesteps of log10 norms, with each
                    step's horizon
``events``          every event: kind, step, origin, layers, message, action; a rollback's with the
                    batches it undid as ranges (``batches``: ``0:0–0:20 (21 batches)``)
``report``          the verdict, severity, findings, notes and counts of ``gradguard report``,
                    from the same code
``static/tab.js``   the frontend
==================  ==========================================================================

A local logdir is read from its event files by :class:`~.eventfile.RunReader` (every point, not
TensorBoard's sample of them; incrementally, so a growing run is never read twice; every run once
at start, in the background); any other logdir through TensorBoard's data provider. Both decode
with :class:`~lightning_gradguard.tensorboard.format.RunDecoder`, as ``gradguard report`` does;
this module reads and serves, and writes nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_gradguard.core.timesteps import summarize_profile
from lightning_gradguard.health.findings import natural_key
from lightning_gradguard.health.judge import ReportError, RunData, judge_run, rollback_batches, skipped_steps_of
from lightning_gradguard.health.ranks import named_ranks
from lightning_gradguard.health.replay import replay_events, run_option
from lightning_gradguard.primitives.ranges import format_batch_ranges
from lightning_gradguard.tensorboard import format as tbformat
from lightning_gradguard.tensorboard import heatmap
from lightning_gradguard.tensorboard.eventfile import RunReader

__all__ = ["GradGuardLoader", "GradGuardPlugin"]

_DOWNSAMPLE = 1_000_000  # read everything the data provider keeps
_MODULE = "/static/tab.js"
_CACHE_SECONDS = 3.0


def _log10(v: float) -> float | None:
    return math.log10(v) if math.isfinite(v) and v > 0 else None


def _skipped_columns(steps: Any, bins: list[list[int]], skipped: dict[int, str]) -> list[str | None]:
    """Per column, why its steps were skipped (every logged step of a bin), or None."""
    import numpy as np

    if not skipped:
        return [None] * len(bins)
    out: list[str | None] = []
    for first, last in bins:
        inside = steps[np.searchsorted(steps, first) : np.searchsorted(steps, last, side="right")].tolist()
        whys = [skipped.get(s) for s in inside]
        if not inside or None in whys:
            out.append(None)
        else:
            out.append(", ".join(dict.fromkeys(part for why in whys if why for part in why.split(", "))))
    return out


class GradGuardPlugin(base_plugin.TBPlugin):  # type: ignore[misc]
    """Serves the GradGuard tab's module and its JSON routes."""

    plugin_name = tbformat.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = context.data_provider
        self._cache: dict[tuple[str, str], tuple[float, RunData]] = {}
        self._derived: dict[tuple[str, str], tuple[RunData, Any]] = {}  # (route, run): its answer
        # A local logdir is read from its event files (all the points, incrementally, fast); any other
        # (a remote filesystem) through the data provider. The local runs are read, and their heatmap and
        # verdict computed, once at start in the background, while TensorBoard loads the same files at
        # its own (slower) pace.
        logdir = getattr(context, "logdir", None)
        self._logdir = Path(logdir) if logdir and Path(logdir).is_dir() else None
        self._readers: dict[str, RunReader] = {}
        if self._logdir is not None:
            threading.Thread(target=self._warm_up, name="gradguard-tab-warm-up", daemon=True).start()

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            _MODULE: wrappers.Request.application(self._serve_module),
            "/runs": self._json(lambda ctx, eid, run: self.runs(ctx, eid)),
            "/layers": self._json(self.layers),
            "/updates": self._json(self.updates),
            "/timesteps": self._json(self.timesteps),
            "/events": self._json(self.events),
            "/report": self._json(self.report),
        }

    def is_active(self) -> bool:
        # TensorBoard enables the tab when our tensor summaries exist (data_plugin_names()); it asks
        # this only otherwise: event files older than the tab still have the guard's scalars.
        from tensorboard.context import RequestContext

        try:
            return bool(self.runs(RequestContext(), ""))
        except Exception:
            return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path=_MODULE, tab_name="GradGuard", disable_reload=False)

    # ------------------------------------------------------------- data
    def runs(self, ctx: Any, eid: str) -> list[str]:
        """The runs holding guard data (the tab's tensors or ``gradguard/`` scalars), sorted."""
        ours = self._data.list_tensors(ctx, experiment_id=eid, plugin_name=tbformat.PLUGIN_NAME)
        scalars = self._data.list_scalars(ctx, experiment_id=eid, plugin_name="scalars")
        guarded = {run for run, tags in scalars.items() if any(t.startswith("gradguard/") for t in tags)}
        return sorted(set(ours) | guarded)

    def read(self, ctx: Any, eid: str, run: str) -> RunData:
        """One run's guard data, through the data provider; kept for a few seconds, so that the tab's
        four routes, asked together, read it once (TensorBoard reloads its logs every 5 s)."""
        key = (eid, run)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return hit[1]
        data = self._read(ctx, eid, run)
        self._cache[key] = (time.monotonic(), data)
        return data

    def _read(self, ctx: Any, eid: str, run: str) -> RunData:
        local = self._reader(run)
        if local is not None:
            try:
                return local.read()
            except ReportError:  # a corrupt file: what TensorBoard itself could read
                pass
        return self._read_provider(ctx, eid, run)

    def _reader(self, run: str) -> RunReader | None:
        if self._logdir is None:
            return None
        reader = self._readers.get(run)
        if reader is None:
            folder = (self._logdir / run).resolve()
            if not folder.is_dir() or not folder.is_relative_to(self._logdir.resolve()):
                return None
            reader = self._readers.setdefault(run, RunReader(folder, strict=False, check=False))
        return reader

    def _warm_up(self) -> None:
        assert self._logdir is not None
        for folder in sorted({p.parent for p in self._logdir.rglob("events.out.tfevents.*")}):
            run = folder.relative_to(self._logdir).as_posix()
            if self._reader(run) is not None:
                with contextlib.suppress(Exception):  # the routes will say what is wrong, if anything
                    self.layers(None, "", run)  # reads the run, and answers the two costly routes ahead
                    self.report(None, "", run)

    def _read_provider(self, ctx: Any, eid: str, run: str) -> RunData:
        only = provider.RunTagFilter(runs=[run])
        decoder = tbformat.RunDecoder()
        scalars = self._data.read_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", downsample=_DOWNSAMPLE, run_tag_filter=only
        ).get(run, {})
        for tag, points in scalars.items():
            for p in points:
                decoder.add_scalar(tag, p.step, float(p.value))
        for plugin in ("text", tbformat.PLUGIN_NAME):
            tensors = self._data.read_tensors(
                ctx, experiment_id=eid, plugin_name=plugin, downsample=_DOWNSAMPLE, run_tag_filter=only
            ).get(run, {})
            for tag, points in tensors.items():
                for p in points:
                    decoder.add_tensor(tag, p.step, p.numpy)
        return decoder.finish()

    def layers(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """Layers (forward order) x logging steps of norms and their log10, fitted to one screen
        (:mod:`.heatmap`: steps binned, layers grouped), the non-finite steps, the thresholds."""
        return self._matrix(ctx, eid, run, "layers", tbformat.LAYER_PREFIX)

    def updates(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """The same matrix for the update-to-weight ratios (``track_updates``), without thresholds."""
        return self._matrix(ctx, eid, run, "updates", tbformat.UPDATE_PREFIX)

    def _matrix(self, ctx: Any, eid: str, run: str, route: str, prefix: str) -> dict[str, Any]:
        import numpy as np

        data = self.read(ctx, eid, run)
        known = self._derived.get((route, run))
        if known is not None and known[0] is data:
            return known[1]  # type: ignore[no-any-return]
        series = {t[len(prefix) :]: s for t, s in data.scalars.items() if t.startswith(prefix)}
        names = [n for n in data.layer_order if n in series]
        names += sorted(set(series) - set(names), key=natural_key)
        every = [np.asarray([s for s, _ in series[n]], np.int64) for n in names]
        steps = np.unique(np.concatenate(every)) if every else np.zeros(0, np.int64)
        values = np.full((len(names), len(steps)), np.nan)
        missing = np.ones((len(names), len(steps)), dtype=bool)
        for i, name in enumerate(names):
            at = np.searchsorted(steps, [s for s, _ in series[name]])
            values[i, at] = [v for _, v in series[name]]
            missing[i, at] = False
        skipped = skipped_steps_of(self._events_of(data, run))
        if route == "updates":  # the update measured at step N is step N - 1's: its column is N
            skipped = {s + 1: why for s, why in skipped.items()}
        # a skipped step's update ratio is no update of the layer's (zero, or the rollback's jump): it
        # marks nothing non-finite, and a bin of many steps shows the worst of the others
        real = ~np.isin(steps, list(skipped)) if route == "updates" else np.ones(len(steps), dtype=bool)
        bad = {row["step"] for row in data.nonfinite} if route == "layers" else set()
        bad |= set(steps[(~np.isfinite(values) & ~missing & real).any(0)].tolist())
        explode = data.config.get("explode_threshold") if route == "layers" else None
        binned = len(steps) > heatmap.MAX_COLUMNS
        cols = heatmap.bin_matrix(steps, values, missing | ~real if binned else missing, explode)
        if binned:  # a binned column is non-finite when any of its steps is
            bad = {first for first, last in cols["bins"] if any(first <= s <= last for s in bad)}
        groups = heatmap.group_rows(names)
        for g in groups:
            cells = zip(*(cols["norms"][i] for i in g["members"]), strict=True)
            g["norms"] = [heatmap.worst(list(c), explode) for c in cells]
            g["log10"] = [None if v is None else _log10(v) for v in g["norms"]]
        out = {
            "run": run,
            "layers": names,
            **cols,
            "log10": [[None if v is None else _log10(v) for v in row] for row in cols["norms"]],
            "groups": groups,
            "nonfinite_steps": sorted(bad),
            "skipped": _skipped_columns(steps, cols["bins"], skipped),
            # the threshold the verdict judged by: the run's, else the guard's default (an older file)
            "vanish_threshold": run_option(data.config, "vanish_threshold") if route == "layers" else None,
            "explode_threshold": explode,
        }
        self._derived[(route, run)] = (data, out)  # answered at once while the run does not grow
        return out

    def _events_of(self, data: RunData, run: str) -> list[dict[str, Any]]:
        """The events the verdict is built from: the recorded ones, or for an older file that recorded
        none, the guard's detectors replayed on its logged steps (each marked ``"replayed": true``)."""
        if data.recorded_events:
            return data.events
        known = self._derived.get(("events", run))
        if known is not None and known[0] is data:
            return known[1]  # type: ignore[no-any-return]
        rows = [{**e, "replayed": True} for e in replay_events(data)]
        self._derived[("events", run)] = (data, rows)
        return rows

    def events(self, ctx: Any, eid: str, run: str) -> list[dict[str, Any]]:
        """The events of the run (recorded, or replayed from an older file's logged steps: ``replayed``);
        a rollback's with the batches it undid as ranges, in the words of ``gradguard report``
        (``batches``: ``0:0–0:20 (21 batches)``), from either version's event; an event that names ranks
        (a replica divergence, a replay in a run of several processes) with them (``ranks``: ``[1, 3]``)."""
        out = []
        data = self.read(ctx, eid, run)
        for e in self._events_of(data, run):
            batches = rollback_batches(e.get("extra") or {}) if e.get("kind") == "rollback" else []
            ranks = [r["rank"] for r in named_ranks(e)]
            added = {"batches": format_batch_ranges(batches)} if batches else {}
            out.append({**e, **added, **({"ranks": ranks} if ranks else {})} if added or ranks else e)
        return out

    def timesteps(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """Each tracked sequence: logging steps (at most 300, evenly spaced, the last kept) x timesteps of
        log10 norms, and each step's horizon."""
        data = self.read(ctx, eid, run)
        out = {}
        for name, every in sorted(data.profiles.items()):
            series = [every[i] for i in heatmap.evenly(len(every))]
            out[name] = {
                "steps": [s for s, _ in series],
                "log10": [[_log10(v) for v in values] for _, values in series],
                "horizon": [summarize_profile(values)["horizon"] for _, values in series],
                "length": max((len(values) for _, values in series), default=0),
            }
        return {"run": run, "sequences": out, "vanish_ratio": data.config.get("timestep_vanish_ratio")}

    def report(self, ctx: Any, eid: str, run: str) -> dict[str, Any]:
        """What ``gradguard report`` says of the run, with the counts it judged (the same code)."""
        data = self.read(ctx, eid, run)
        known = self._derived.get(("report", run))
        if known is not None and known[0] is data:
            return known[1]  # type: ignore[no-any-return]
        try:
            rep = judge_run(run, data)
        except ReportError as exc:
            return {"run": run, "verdict": f"no report: {exc}", "findings": [], "healthy": None, "severity": None}
        out = {
            "run": run, "verdict": rep.verdict, "findings": rep.findings, "healthy": rep.healthy,
            "severity": rep.severity, "notes": rep.notes, "nonfinite_steps": rep.nonfinite_steps,
            "skipped_steps": rep.skipped_steps, "events": rep.event_count, "events_from": rep.events_from,
        }  # fmt: skip
        self._derived[("report", run)] = (data, out)
        return out

    # ------------------------------------------------------------ serving
    def _json(self, fn: Any) -> Any:
        @wrappers.Request.application  # type: ignore[misc]
        def serve(request: Any) -> Any:
            from tensorboard import plugin_util

            ctx = plugin_util.context(request.environ)
            eid = plugin_util.experiment_id(request.environ)
            run = request.args.get("run", "")
            body = tbformat.json_safe(fn(ctx, eid, run))
            return http_util.Respond(request, body, "application/json")

        return serve

    def _serve_module(self, request: Any) -> Any:
        source = resources.files("lightning_gradguard.tensorboard").joinpath("static/tab.js").read_bytes()
        return http_util.Respond(request, source, "text/javascript")


class GradGuardLoader(base_plugin.TBLoader):  # type: ignore[misc]
    """Loads the tab, and keeps every sample of its tensor series.

    TensorBoard keeps 10 samples of each tensor series of a plugin it does not know; the tab needs
    all of them (every logging step's profile, every event). Unless the user passed
    ``--samples_per_plugin gradguard=N``, this sets ``gradguard=0`` (all).
    """

    def fix_flags(self, flags: Any) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(tbformat.PLUGIN_NAME, 0)

    def load(self, context: base_plugin.TBContext) -> GradGuardPlugin:
        return GradGuardPlugin(context)
