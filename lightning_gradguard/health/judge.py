"""Judging a run's gradient health from what it logged: the verdict of ``gradguard report`` and the tab.

:func:`judge_run` takes a :class:`RunData` (decoded from event files or from TensorBoard's data
provider by :mod:`lightning_gradguard.tensorboard.format`) and returns a :class:`RunHealth`:

* per layer: the median, max and last gradient norm, with flags ``vanishing`` (median below the
  run's ``vanish_threshold``, as recorded in its configuration; 1e-8, the guard's default, for event
  files that predate the record), ``exploding`` (a non-finite value, or a logged norm above 1000x the
  median of the 5 logs before it) and ``spiky`` (above 10x that median);
* the total-norm trend, the clipped fraction, the non-finite steps with their origins, each tracked
  sequence's per-timestep ``horizon`` and ``first_last_ratio`` (judged against the run's
  ``timestep_vanish_ratio``);
* a one-line verdict, and one line of advice per finding.

The suggested ``NormClip(max_norm=...)`` is the median of the run's finite pre-clip total norms:
Pascanu, Mikolov and Bengio (2013) advise a threshold near the typical norm, so that ordinary steps
pass untouched and only the outliers are rescaled.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "ReportError", "RunData", "RunHealth", "judge_run"]

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
)
VANISH = 1e-8  # the defaults of the guard, for event files that predate the recorded configuration
TIMESTEP_VANISH_RATIO = 1e-4


class ReportError(Exception):
    """A usage error: printed as one line, exit status 2."""


@dataclass
class RunHealth:
    """What :func:`judge_run` found in one run."""

    run: str
    steps: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    total_norm: dict[str, float] = field(default_factory=dict)
    clipped_fraction: float | None = None
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    timesteps: dict[str, dict[str, float]] = field(default_factory=dict)
    profiles: dict[str, list[float]] = field(default_factory=dict)
    alert_kinds: dict[str, int] = field(default_factory=dict)
    findings: list[dict[str, str]] = field(default_factory=list)
    verdict: str = ""

    def kinds(self) -> set[str]:
        found = {f["kind"] for f in self.findings} | set(self.alert_kinds)
        if self.nonfinite_steps:
            found.add("nonfinite")
        return found

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
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    profiles: dict[str, list[tuple[int, list[float]]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    alert_kinds: dict[str, int] = field(default_factory=dict)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _largest_jump(values: Sequence[float], window: int = 5) -> float:
    """The largest ratio of a logged norm to the median of the (up to) ``window`` logs before it.

    Relative to the recent past, not to the whole run: a norm that is large early and decays as the
    model learns is not a spike.
    """
    worst = 0.0
    for i in range(3, len(values)):
        ref = statistics.median(values[max(0, i - window) : i])
        if ref > 0:
            worst = max(worst, values[i] / ref)
    return worst


def judge_run(run: str, data: RunData) -> RunHealth:
    """Judge one run's gradients from its data (the same code for the CLI and the tab).

    Raises:
        ReportError: the run holds no ``gradguard/`` metrics.
    """
    ours = data.scalars
    if not ours:
        raise ReportError(f"{run} holds no gradguard/ metrics: was GradGuard among the Trainer's callbacks?")
    steps = max(s for series in ours.values() for s, _ in series) + 1
    rep = RunHealth(run=run, steps=steps)
    vanish = _recorded(data.config, "vanish_threshold", VANISH)
    rep.layers = _layer_stats(ours, vanish)
    rep.layer_order = list(data.layer_order) or sorted(rep.layers)
    totals = [v for _, v in ours.get("gradguard/total_norm", [])]
    fin = _finite(totals)
    if fin:
        q = max(1, len(fin) // 4)
        first, last = statistics.median(fin[:q]), statistics.median(fin[-q:])
        rep.total_norm = {
            "median": statistics.median(fin),
            "max": max(fin),
            "first_quarter": first,
            "last_quarter": last,
            "trend": last / first if first > 0 else math.nan,
        }
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
    _judge(rep, _recorded(data.config, "timestep_vanish_ratio", TIMESTEP_VANISH_RATIO))
    return rep


def _recorded(config: dict[str, Any], name: str, default: float) -> float:
    """The run's recorded option ``name``, or the guard's default for files that predate the record."""
    value = config.get(name)
    return float(value) if isinstance(value, (int, float)) else default


def _layer_stats(ours: dict[str, list[tuple[int, float]]], vanish: float) -> dict[str, dict[str, Any]]:
    """Per layer: median, max, last and flags (vanishing below ``vanish``, exploding, spiky)."""
    layers: dict[str, dict[str, Any]] = {}
    for tag, series in sorted(ours.items()):
        if not tag.startswith("gradguard/layer/"):
            continue
        values = [v for _, v in series]
        fin = _finite(values)
        median = statistics.median(fin) if fin else math.nan
        peak = max(fin) if fin else math.nan
        flags = []
        if fin and median < vanish:
            flags.append("vanishing")
        jump = _largest_jump(fin)
        if len(fin) < len(values) or jump > 1000:
            flags.append("exploding")
        elif jump > 10:
            flags.append("spiky")
        layers[tag[len("gradguard/layer/") :]] = {"median": median, "max": peak, "last": values[-1], "flags": flags}
    return layers


def _judge(rep: RunHealth, in_time_ratio: float) -> None:
    typical = rep.total_norm.get("median")
    suggestion = f"NormClip(max_norm={typical:.2g})" if typical and math.isfinite(typical) else "NormClip(max_norm=...)"
    if rep.nonfinite_steps:
        origins = sorted({n["origin"] for n in rep.nonfinite})
        rep.findings.append(
            {
                "kind": "nonfinite",
                "what": f"{rep.nonfinite_steps} non-finite steps ({rep.skipped_steps} skipped); origins: "
                f"{', '.join(origins) or 'unknown'}",
                "advice": "replay the first one from a dump (GradGuard(dump_dir=...)) and look at its origin layer; "
                f"if it follows an explosion, clip with {suggestion} or ZClip()",
            }
        )
    exploding = [n for n, v in rep.layers.items() if "exploding" in v["flags"]]
    spiky = [n for n, v in rep.layers.items() if "spiky" in v["flags"]]
    vanishing = [n for n, v in rep.layers.items() if "vanishing" in v["flags"]]
    if exploding:
        rep.findings.append(
            {
                "kind": "exploding",
                "what": f"exploding gradients in {', '.join(exploding)}",
                "advice": f"clip the total norm near its typical value: {suggestion}, or ZClip() for rare spikes",
            }
        )
    if spiky or "spike" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "spiky",
                "what": f"gradient spikes{(' in ' + ', '.join(spiky)) if spiky else ''}",
                "advice": f"ZClip() clips spikes against the run's own statistics; or {suggestion}",
            }
        )
    if vanishing or "vanishing" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "vanishing",
                "what": f"vanishing gradients{(' in ' + ', '.join(vanishing)) if vanishing else ''}",
                "advice": "check initialisation and normalisation (a residual path, LayerNorm); for RNNs a gated cell",
            }
        )
    for name, s in rep.timesteps.items():
        ratio = s.get("first_last_ratio", math.nan)
        if ratio == ratio and ratio < in_time_ratio:
            rep.findings.append(
                {
                    "kind": "vanishing_in_time",
                    "what": f"'{name}': the gradient through time vanishes (first/last {ratio:.2g}, horizon "
                    f"{s.get('horizon', math.nan):.0f} steps)",
                    "advice": "use a gated cell (LSTM or GRU; a forget-gate bias near 1-3) or a shorter truncation "
                    "(truncated BPTT) so that the dependency fits in the horizon",
                }
            )
        elif ratio == ratio and ratio > 1 / in_time_ratio:
            rep.findings.append(
                {
                    "kind": "exploding_in_time",
                    "what": f"'{name}': the gradient through time explodes (first/last {ratio:.2g})",
                    "advice": f"clip ({suggestion}); an orthogonal recurrent init with gain <= 1",
                }
            )
    dead = [n for n, v in rep.layers.items() if v["median"] == 0.0]
    if dead or "dead" in rep.alert_kinds or "unused" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "dead" if dead or "dead" in rep.alert_kinds else "unused",
                "what": "layers with zero or no gradient" + (f": {', '.join(dead)}" if dead else ""),
                "advice": "check the wiring: a detached path, an unused branch, a zero multiplier or dead ReLUs",
            }
        )
    if "loss_scale_collapse" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "loss_scale_collapse",
                "what": "the fp16 loss scale collapsed",
                "advice": "look for an fp16-unsafe op, lower the learning rate, or train in bf16",
            }
        )
    if not rep.findings:
        rep.verdict = f"healthy: {rep.steps} steps, no non-finite step, no exploding, spiky or vanishing layer"
    else:
        rep.verdict = "unhealthy: " + "; ".join(f["what"] for f in rep.findings)

