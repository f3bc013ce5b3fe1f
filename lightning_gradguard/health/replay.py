"""Replaying a run's logged series through the guard's own detectors.

A run written by this version records every event the live guard raised (``RunData.events``), and
those are what a report judges. Older event files (0.2.0) hold only the series: the report then
feeds the logged steps, in order, to the same detector classes the live guard used
(:func:`~lightning_gradguard.detectors.default_detectors`), with the run's recorded thresholds (the
guard's defaults where none were recorded). There is no second definition of a spike or of a
vanishing layer.

What a replay cannot see, it says (:func:`replay_caveat`): it has only the logging steps (the live
guard scored every step), no weight norms (``vanish_ratio``), no fp16 loss scale, and no unused
layers.

Example::

    >>> from lightning_gradguard.health.judge import RunData
    >>> data = RunData(scalars={"gradguard/total_norm": [(s, 1.0) for s in range(4)],
    ...                         "gradguard/layer/fc": [(s, 1e-12) for s in range(4)]})
    >>> [(e["kind"], e["step"], e["layers"]) for e in replay_events(data)]
    [('vanishing', 2, ['fc'])]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_gradguard.detectors import Observation, default_detectors
from lightning_gradguard.detectors.spike import HostSpikeStats

__all__ = ["DEFAULTS", "replay_caveat", "replay_events", "run_option"]

# The guard's defaults (GuardCore's signature), for event files that predate the recorded configuration.
DEFAULTS: dict[str, Any] = {
    "explode_threshold": None,
    "spike_zscore": 6.0,
    "spike_warmup": 50,
    "vanish_threshold": 1e-8,
    "vanish_ratio": None,
    "vanish_patience": 3,
    "min_loss_scale": 1.0,
    "timestep_vanish_ratio": 1e-4,
}
_LAYER = "gradguard/layer/"
_TIMESTEP = "gradguard/timestep/"


def run_option(config: Mapping[str, Any], name: str) -> Any:
    """The run's recorded option ``name``, or the guard's default when the run did not record it."""
    return config[name] if name in config else DEFAULTS[name]


def replay_events(data: Any) -> list[dict[str, Any]]:
    """The events the guard's detectors raise on the run's logged steps, as event rows (the shape of
    ``RunData.events``), in step order; plus one ``nonfinite`` row per non-finite step the run logged."""
    options = {name: run_option(data.config, name) for name in DEFAULTS}
    # the guard's one spike rule, on the logged total norms (the live guard scored every step)
    spikes = HostSpikeStats(options.pop("spike_warmup"), threshold=options["spike_zscore"])
    detectors = default_detectors(**options)
    totals = dict(data.scalars.get("gradguard/total_norm", []))
    layers: dict[int, dict[str, float]] = {}
    for tag, series in data.scalars.items():
        if tag.startswith(_LAYER):
            for step, value in series:
                layers.setdefault(step, {})[tag[len(_LAYER) :]] = value
    in_time: dict[int, dict[str, dict[str, float]]] = {}
    for tag, series in data.scalars.items():
        if tag.startswith(_TIMESTEP) and tag.count("/") >= 3:
            name, summary = tag[len(_TIMESTEP) :].rsplit("/", 1)
            for step, value in series:
                in_time.setdefault(step, {}).setdefault(name, {})[summary] = value
    bad = {int(row["step"]) for row in data.nonfinite}
    rows: list[dict[str, Any]] = []
    for step in sorted(set(totals) | set(layers) | bad):
        total = totals.get(step, math.nan)
        nonfinite = step in bad or (step in totals and not math.isfinite(total))
        norms = layers.get(step, {})
        obs = Observation(
            step, 0, total, not nonfinite, nonfinite, math.nan, logged=True, layer_norms=norms,
            timestep_summaries={n: s for n, s in in_time.get(step, {}).items() if "first_last_ratio" in s},
            layers_now=lambda norms=norms: dict(norms),  # type: ignore[misc]
        )  # fmt: skip
        if not nonfinite:
            obs.spike_z = spikes.score(math.log(total) if math.isfinite(total) and total > 0 else math.nan)
        for detector in detectors:
            for event in detector.detect(obs):
                row = event.as_dict()
                row.pop("extra", None)
                row["layers"] = list(row["layers"])
                rows.append(row)
    for row in data.nonfinite:
        layers_of = [name for name in str(row.get("layers", "")).split(",") if name]
        rows.append({"kind": "nonfinite", "step": int(row["step"]), "origin": row.get("origin"),
                     "action": row.get("action"), "layers": layers_of, "message": "", "value": None})  # fmt: skip
    rows.sort(key=lambda r: r["step"])
    return rows


def replay_caveat(data: Any, steps: int) -> str:
    """What a replay could not see, as a clause for the findings ('' when it saw every step)."""
    logged = len(data.scalars.get("gradguard/total_norm", []))
    if logged >= steps:
        return ""
    return f" (replayed on the {logged} logged steps of {steps}: the live guard saw every step)"
