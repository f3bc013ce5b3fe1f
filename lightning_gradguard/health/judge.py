"""Judging a run's gradient health from what it logged: the verdict of ``gradguard report`` and the tab.

:func:`judge_run` takes a :class:`RunData` (decoded from event files or from TensorBoard's data
provider by :mod:`lightning_gradguard.tensorboard.format`) and returns a :class:`RunHealth`:

* the events: those the live guard recorded with the run, or, for files older than that record,
  the guard's own detectors replayed on the logged series with the run's thresholds
  (:mod:`.replay`); there is one definition of a spike, a vanishing layer, an explosion;
* findings from the events, each with a severity and advice that fits the run (:mod:`.findings`);
  the guard's own stop comes first;
* per layer: the median, max and last gradient norm, flagged by the events that name it;
* the total-norm trend, the clipped fraction, the non-finite steps with their origins, each tracked
  sequence's per-timestep ``horizon`` and ``first_last_ratio``;
* notes for a healthy run (a clipper at work, large early gradients), and a one-line verdict.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_gradguard.health.findings import SEVERITIES, Evidence, findings_of, natural_key, severity_of
from lightning_gradguard.health.ranks import per_rank, suspect_devices
from lightning_gradguard.health.replay import DEFAULTS, replay_caveat, replay_events, run_option
from lightning_gradguard.primitives.ranges import batch_count, batch_ranges
from lightning_gradguard.primitives.text import plural

__all__ = ["KINDS", "ReportError", "RunData", "RunHealth", "judge_run", "rollback_batches", "skipped_steps_of"]

KINDS = (  # the findings --fail-on can name
    "exploding",
    "spike",
    "spiky",
    "vanishing",
    "vanishing_in_time",
    "exploding_in_time",
    "dead",
    "unused",
    "loss_scale_collapse",
    "nonfinite",
    "stopped",
    "rollback",
    "spike_skipped",
    "replica_divergence",
)
VANISH = DEFAULTS["vanish_threshold"]
_FLAG_OF = {"vanishing": "vanishing", "dead": "dead", "spike": "spiky", "unused": "unused"}


class ReportError(Exception):
    """A usage error: printed as one line, exit status 2."""


@dataclass
class RunHealth:
    """What :func:`judge_run` found in one run.

    ``severity`` is ``healthy``, ``healthy with notes``, ``attention`` or ``unhealthy``
    (:mod:`~lightning_gradguard.health.findings`); ``verdict`` is one line that starts with it (or,
    when the guard stopped the run, with that); ``notes`` are what a healthy run may still want to
    know (a clipper at work, large early gradients); ``events_from`` says whether the findings come
    from the events the live guard recorded or from a replay of the logged series (older files);
    ``logged_steps`` counts the logging steps (0: a run shorter than its ``log_every_n_steps``, judged
    by its recorded events alone); ``per_rank`` and ``suspect_devices`` are what the events say of each
    rank of a data-parallel run and the devices they suspect (:mod:`.ranks`; empty for one process).
    """

    run: str
    steps: int
    logged_steps: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    total_norm: dict[str, float] = field(default_factory=dict)
    clipped_fraction: float | None = None
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    skipped_batches: list[dict[str, Any]] = field(default_factory=list)
    replays: list[dict[str, Any]] = field(default_factory=list)
    per_rank: dict[str, dict[str, Any]] = field(default_factory=dict)
    suspect_devices: list[dict[str, Any]] = field(default_factory=list)
    timesteps: dict[str, dict[str, float]] = field(default_factory=dict)
    profiles: dict[str, list[float]] = field(default_factory=dict)
    alert_kinds: dict[str, int] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""
    severity: str = "healthy"
    notes: list[str] = field(default_factory=list)
    events_from: str = "recorded"
    event_count: int = 0
    vanish_threshold: float = VANISH

    def kinds(self) -> set[str]:
        """The kinds ``--fail-on`` matches: the findings' (``spiky`` also answers to ``spike``)."""
        found = {f["kind"] for f in self.findings}
        if "spiky" in found:
            found.add("spike")
        if self.nonfinite_steps:
            found.add("nonfinite")
        return found

    def fails(self, fail_on: Iterable[str] = ()) -> bool:
        """Whether ``gradguard report`` exits 1 for this run: non-finite steps or replicas that diverged
        (always: the model's state is wrong), or a finding of a kind that ``fail_on`` names."""
        kinds = self.kinds()
        return bool(self.nonfinite_steps) or "replica_divergence" in kinds or bool(kinds & set(fail_on))

    @property
    def healthy(self) -> bool:
        return self.severity in SEVERITIES[:2]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RunData:
    """A run's guard data, however it was read (:class:`~lightning_gradguard.tensorboard.format.RunDecoder`
    decodes it from event files and from the tab's data provider); :func:`judge_run` judges it.

    Attributes:
        scalars: every ``gradguard/`` scalar series, ``tag -> [(step, value)]``.
        profiles: each tracked sequence's per-timestep profiles, ``name -> [(step, norms)]``.
        events: every event the run recorded (dicts with kind, step, origin, layers, message, action).
        config: the options the guard ran with (empty for event files older than the record).
        layer_order: the layers in forward order (empty when the run did not record it).
        nonfinite: each non-finite step: ``{"step", "origin", "action", "layers"}`` (layers comma-joined).
        alert_kinds: how many alerts of each kind passed the rate limit.
        recorded_events: ``events`` holds every event the live guard recorded (files of this version);
            False for older files, whose events the report replays from the logged series.
        summary: what the guard wrote at the end of fit, ``{"steps", "log_every_n_steps"}`` (empty
            for a run still going, killed, or older than the record).
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    profiles: dict[str, list[tuple[int, list[float]]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    alert_kinds: dict[str, int] = field(default_factory=dict)
    recorded_events: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


def judge_run(run: str, data: RunData) -> RunHealth:
    """Judge one run's gradients from its data (the same code for the CLI and the tab).

    A run without a logging step (shorter than its ``log_every_n_steps``) holds no metrics; it is
    judged by the configuration, the events and the summary the guard wrote at the end of fit.

    Raises:
        ReportError: the run holds nothing the guard writes (no metrics, configuration or events).
    """
    ours = data.scalars
    if not ours and not (data.config or data.recorded_events or data.summary):
        raise ReportError(f"{run} holds no gradguard/ metrics: was GradGuard among the Trainer's callbacks?")
    if ours:
        steps = max(s for series in ours.values() for s, _ in series) + 1
    else:  # the events (a run still going, or killed before its summary) say how far it got at least
        steps = max((int(e.get("step", 0)) + 1 for e in data.events), default=0)
    steps = max(steps, int(data.summary.get("steps", 0)))
    rep = RunHealth(run=run, steps=steps, logged_steps=max((len(series) for series in ours.values()), default=0))
    rep.layer_order = list(data.layer_order)
    rep.vanish_threshold = float(run_option(data.config, "vanish_threshold"))
    rep.total_norm = _total_norm_stats([v for _, v in ours.get("gradguard/total_norm", [])])
    fractions = [v for _, v in ours.get("gradguard/clipped_fraction", [])]
    rep.clipped_fraction = statistics.fmean(fractions) if fractions else None
    rep.skipped_steps = int(max((v for _, v in ours.get("gradguard/skipped_steps", [])), default=0))
    rep.nonfinite_steps = int(max((v for _, v in ours.get("gradguard/nonfinite_steps", [])), default=0))
    rep.nonfinite = [dict(row) for row in data.nonfinite]
    rep.nonfinite_steps = max(rep.nonfinite_steps, len(rep.nonfinite))
    for tag, series in ours.items():
        m = re.match(r"gradguard/timestep/(.+)/(horizon|first_last_ratio|decay_per_step)$", tag)
        if m:
            rep.timesteps.setdefault(m.group(1), {})[m.group(2)] = series[-1][1]
    rep.profiles = {name: series[-1][1] for name, series in data.profiles.items() if series}
    rep.alert_kinds = dict(data.alert_kinds)
    if data.recorded_events:
        events, caveat = data.events, ""
    else:
        events, caveat = replay_events(data), replay_caveat(data, steps)
        rep.events_from = "replayed"
    rep.event_count = len(events)
    rep.rollbacks, rep.skipped_batches = _recovery(events)
    rep.replays = [_replay_of(e) for e in events if "replay" in (e.get("extra") or {})]
    rep.per_rank, rep.suspect_devices = per_rank(events), suspect_devices(events)
    rep.skipped_steps = max(rep.skipped_steps, sum(1 for e in events if str(e.get("action", "")) == "skipped"))
    rep.layers = _layer_stats(ours, events)
    rep.layer_order = rep.layer_order or sorted(rep.layers, key=natural_key)
    evidence = Evidence(
        ours.get("gradguard/total_norm", []), dict(ours.get("gradguard/total_norm_clipped", [])),
        data.config["clip"] if "clip" in data.config else _clip_of(data), rep.clipped_fraction, steps, caveat,
        rep.layer_order, {name: row["median"] for name, row in rep.layers.items()},
    )  # fmt: skip
    rep.findings = findings_of(events, evidence)
    if not data.recorded_events:
        rep.findings += _unreplayed_alerts(rep, data.alert_kinds)
    rep.notes = _notes(rep, evidence)
    rep.severity = severity_of(rep.findings, rep.notes)
    rep.verdict = _verdict(rep, data.summary)
    return rep


def _replay_of(event: dict[str, Any]) -> dict[str, Any]:
    """A replayed fault's verdict (recorded by the live guard in the event's ``extra``)."""
    replay = event["extra"]["replay"]
    keys = ("verdict", "forward_origin", "input_nonfinite", "faulty_ranks")
    return {"step": event["step"], "kind": event["kind"], **{k: replay.get(k) for k in keys}}


def _recovery(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rollbacks (step, snapshot step, cause, the batches undone as ranges ``[epoch, first, last]``
    and their count) and the skipped steps with why: the skip list as the event file holds it."""
    rollbacks, skipped = [], []
    for e in events:
        extra = e.get("extra") or {}
        if e.get("kind") == "rollback":
            batches = rollback_batches(extra)
            rollbacks.append({"step": e["step"], "snapshot_step": extra.get("snapshot_step"),
                              "cause": extra.get("cause", ""), "batches": batches,
                              "batch_count": batch_count(batches)})  # fmt: skip
        elif str(e.get("action", "")) == "skipped" and e.get("kind") in ("nonfinite", "spike_skipped"):
            skipped.append({"step": e["step"], "reason": "spike" if e["kind"] == "spike_skipped" else "nonfinite"})
    return rollbacks, skipped


def rollback_batches(extra: dict[str, Any]) -> list[list[int]]:
    """The batches a ``rollback`` event undid, as ranges ``[epoch, first, last]``: its ``batch_ranges``,
    or, in an event of an earlier version, its flat ``batches_skipped`` list of ``[epoch, batch]`` pairs
    (duplicates included), compressed.

    Example::

        >>> rollback_batches({"batches_skipped": [[0, 0], [0, 1], [0, 0], [0, 2], [1, 0]]})
        [[0, 0, 2], [1, 0, 0]]
        >>> rollback_batches({"batch_ranges": [[0, 0, 20]], "batch_count": 21})
        [[0, 0, 20]]
    """
    if "batch_ranges" in extra:
        return [[int(e), int(a), int(b)] for e, a, b in extra["batch_ranges"]]
    return batch_ranges(extra.get("batches_skipped") or [])


# a recorded event whose step was not applied: (kind, action) -> why; kind None: any action
_SKIPPED_BY = {
    ("nonfinite", "skipped"): "non-finite", ("nonfinite", "stopped"): "non-finite",
    ("nonfinite", "skipped by the GradScaler"): "non-finite", ("amp_overflow", None): "fp16 overflow",
    ("spike_skipped", "skipped"): "spike", ("rollback", "rolled back"): "rolled back",
}  # fmt: skip


def skipped_steps_of(events: list[dict[str, Any]]) -> dict[int, str]:
    """The steps whose update was not applied, each with why (``non-finite``, ``spike``, ``rolled back``,
    ``fp16 overflow``, comma-joined when several): what the tab draws as skipped instead of a value.

    Example::

        >>> skipped_steps_of([{"kind": "nonfinite", "step": 5, "action": "skipped"},
        ...                   {"kind": "rollback", "step": 5, "action": "rolled back"},
        ...                   {"kind": "nonfinite", "step": 7, "action": "warned"}])
        {5: 'non-finite, rolled back'}
    """
    out: dict[int, list[str]] = {}
    for e in events:
        kind, action = str(e.get("kind", "")), str(e.get("action", ""))
        why = _SKIPPED_BY.get((kind, action)) or _SKIPPED_BY.get((kind, None))
        if why is None and action == "skipped":  # a component's own skip (its own kind)
            why = kind
        if why is not None and why not in out.setdefault(int(e["step"]), []):
            out[int(e["step"])].append(why)
    return {step: ", ".join(whys) for step, whys in sorted(out.items())}


def _total_norm_stats(totals: list[float]) -> dict[str, float]:
    fin = [v for v in totals if math.isfinite(v)]
    if not fin:
        return {}
    q = max(1, len(fin) // 4)
    first, last = statistics.median(fin[:q]), statistics.median(fin[-q:])
    return {"median": statistics.median(fin), "max": max(fin), "first_quarter": first, "last_quarter": last,
            "trend": last / first if first > 0 else math.nan}  # fmt: skip


def _clip_of(data: RunData) -> str | None:
    """Files that did not record the clipper: one was in force if clipped norms were logged."""
    return "a clipper" if "gradguard/total_norm_clipped" in data.scalars else None


def _unreplayed_alerts(rep: RunHealth, alert_kinds: dict[str, int]) -> list[dict[str, Any]]:
    """Kinds an older run alerted on that the replay of its logged steps does not show."""
    have = rep.kinds() | {"spike" if f["kind"] == "spiky" else f["kind"] for f in rep.findings}
    out = []
    for kind, count in sorted(alert_kinds.items()):
        if kind not in have and kind not in ("nonfinite", "amp_overflow"):
            severity = "unhealthy" if kind in ("vanishing", "spike", "exploding") else "attention"
            out.append({"kind": "spiky" if kind == "spike" else kind, "severity": severity,
                        "what": f"{plural(count, kind + ' alert')} (from the run's alert texts)",
                        "advice": "see the alert texts in TensorBoard's Text tab"})  # fmt: skip
    return out


def _notes(rep: RunHealth, ev: Evidence) -> list[str]:
    notes = []
    if rep.clipped_fraction and ev.clip is not None:
        notes.append(f"{ev.clip} clipped {rep.clipped_fraction:.0%} of the logged steps ({ev.distribution()})")
    trend = rep.total_norm.get("trend", math.nan)
    if trend == trend and trend < 0.1:
        notes.append(
            f"large gradients early in training: the total norm's median fell from "
            f"{rep.total_norm['first_quarter']:.3g} (first quarter) to {rep.total_norm['last_quarter']:.3g} (last)"
        )
    return notes


def _verdict(rep: RunHealth, summary: dict[str, Any]) -> str:
    if rep.findings:
        stop = [f for f in rep.findings if f["kind"] == "stopped"]
        rest = "; ".join(f["what"] for f in rep.findings if f["kind"] != "stopped")
        if stop:
            return f"{stop[0]['what']}: {stop[0]['advice']}" + (f" | {rep.severity}: {rest}" if rest else "")
        return f"{rep.severity}: {rest}"
    if not rep.logged_steps:  # no norm was logged: nothing can be said of the layers
        cadence = summary.get("log_every_n_steps")
        why = f" (log_every_n_steps={cadence})" if cadence else ""
        if not summary:
            why = " yet (no end-of-fit summary: the run is still going, or was killed)"
        return (f"{rep.severity}: {plural(rep.steps, 'step')}, no logging step{why}: no non-finite step; "
                "no gradient norm was logged, so the layers are not judged")  # fmt: skip
    line = f"{rep.severity}: {plural(rep.steps, 'step')}, no non-finite step, no spike, vanishing or dead layer"
    return line + (f"; notes: {'; '.join(rep.notes)}" if rep.notes else "")


def _layer_stats(ours: dict[str, list[tuple[int, float]]], events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layer: median, max and last logged norm, and flags from the events that name it."""
    flags: dict[str, list[str]] = {}
    for e in events:
        flag = _FLAG_OF.get(str(e.get("kind")))
        if flag is None:
            continue
        named = (e.get("layers") or [])[:1] if flag == "spiky" else (e.get("layers") or [])
        for name in named:
            if flag not in flags.setdefault(name, []):
                flags[name].append(flag)
    layers: dict[str, dict[str, Any]] = {}
    for tag, series in sorted(ours.items()):
        if not tag.startswith("gradguard/layer/"):
            continue
        values = [v for _, v in series]
        fin = [v for v in values if math.isfinite(v)]
        name = tag[len("gradguard/layer/") :]
        layers[name] = {"median": statistics.median(fin) if fin else math.nan, "max": max(fin) if fin else math.nan,
                        "last": values[-1], "flags": flags.get(name, [])}  # fmt: skip
    return layers
