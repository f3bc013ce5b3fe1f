"""The one owner of GradGuard's TensorBoard format: every tag, and each writer beside its reader.

The sink (:mod:`.sink`) writes through the ``write_*`` functions here; ``gradguard report`` and the
tab (:mod:`.plugin`) read through :class:`RunDecoder`, which turns what an event file holds into a
:class:`~lightning_gradguard.health.judge.RunData`. No other module names a tag or parses a summary.

Structured data (tensor summaries under the plugin name ``gradguard``):

=====================================  ====================================================  =========
tag                                    value                                                 when
=====================================  ====================================================  =========
``gradguard/config``                   JSON: the options the run was guarded with            fit start
                                       (thresholds, norm type, clipper)
``gradguard/profile/<name>``           float32 vector: a tracked sequence's per-timestep     logging
                                       gradient norms (index 0 = earliest timestep)          steps
``gradguard/events``                   JSON: a list of events (kind, step, origin, layers,   logging
                                       message, action, ``alerted``: it passed the alert     steps
                                       rate limit), every event since the last write
``gradguard/layer_order``              JSON: the layers in forward order                     when it
                                                                                             changes
``gradguard/summary``                  JSON: ``{"steps", "log_every_n_steps", "text"}``, the end of
                                       run's optimizer steps, its logging cadence and the    fit
                                       guard's summary, whatever the cadence (a run
                                       shorter than it logs no metric)
=====================================  ====================================================  =========

The metrics are scalars (``gradguard/total_norm``, ``gradguard/layer/<name>``, ...: the keys of
:mod:`lightning_gradguard.primitives.keys`). For people reading TensorBoard's Text tab the sink
also writes ``gradguard/alerts`` (the rate-limited alerts) and ``gradguard/nonfinite`` (one line per
non-finite step); these are never parsed, except in event files older than the structured data:

* 0.2.0 wrote no ``gradguard/events``: its non-finite steps and alert kinds are read from those
  texts, and its profiles from the JSON text ``gradguard/timestep_profile/<name>``;
* files from before ``alerted`` and ``gradguard/layer_order`` became structured hold the alert kinds
  and the layer order only as text, read the same way.

TensorBoard keeps only 10 samples of each tensor series of a plugin it does not know, unless told
otherwise: the tab's loader sets ``--samples_per_plugin gradguard=0`` (keep all) unless the user
chose a value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from lightning_gradguard.events import GradEvent
from lightning_gradguard.health.judge import RunData
from lightning_gradguard.primitives.keys import LAYER_KEY_PREFIX, METRIC_PREFIX, UPDATE_KEY_PREFIX

__all__ = [
    "ALERTS_TAG",
    "CONFIG_TAG",
    "EVENTS_TAG",
    "FLOW_TAG",
    "HIST_PREFIX",
    "LAYER_ORDER_TAG",
    "LAYER_PREFIX",
    "NONFINITE_TAG",
    "PLUGIN_NAME",
    "PROFILE_PREFIX",
    "SUMMARY_TAG",
    "TIMESTEP_IMAGE_PREFIX",
    "RunDecoder",
    "custom_scalars_layout",
    "json_safe",
    "write_alert_text",
    "write_config",
    "write_events",
    "write_layer_order",
    "write_nonfinite_text",
    "write_profile",
    "write_summary",
]

PLUGIN_NAME = "gradguard"
CONFIG_TAG = "gradguard/config"
EVENTS_TAG = "gradguard/events"
PROFILE_PREFIX = "gradguard/profile/"
LAYER_ORDER_TAG = "gradguard/layer_order"  # JSON under the plugin; older files: a text summary
SUMMARY_TAG = "gradguard/summary"  # JSON: the run's steps at the end of fit
ALERTS_TAG = "gradguard/alerts"  # text, for people
NONFINITE_TAG = "gradguard/nonfinite"  # text, for people
FLOW_TAG = "gradguard/flow"  # image
TIMESTEP_IMAGE_PREFIX = "gradguard/timestep/"  # image per tracked sequence
HIST_PREFIX = "gradguard/hist/"  # histogram per layer
LAYER_PREFIX = LAYER_KEY_PREFIX  # scalar per layer
UPDATE_PREFIX = UPDATE_KEY_PREFIX  # scalar per layer (track_updates)
_TEXT_SUFFIX = "/text_summary"  # what TensorBoard's text plugin appends to a text tag
_LEGACY_PROFILE_PREFIX = "gradguard/timestep_profile/"  # 0.2.0: JSON text


# ----------------------------------------------------------------------------------------- writing
def _summary(tag: str, value: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.util import tensor_util

    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=b"1"),
        data_class=DATA_CLASS_TENSOR,  # the data provider lists tensors of this class only
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor_util.make_tensor_proto(value))])


def _add(writer: Any, tag: str, value: Any, step: int) -> bool:
    get_file_writer = getattr(writer, "_get_file_writer", None)  # torch's and tensorboardX's SummaryWriter
    if get_file_writer is None:
        return False
    get_file_writer().add_summary(_summary(tag, value), step)
    return True


def _write_json(writer: Any, tag: str, obj: Any, step: int) -> bool:
    return _add(writer, tag, json.dumps(json_safe(obj), allow_nan=False), step)


def write_profile(writer: Any, name: str, values: Any, step: int) -> bool:
    """A tracked sequence's per-timestep norms as a float32 vector; False when ``writer`` cannot."""
    import numpy as np

    return _add(writer, f"{PROFILE_PREFIX}{name}", np.asarray(values, dtype=np.float32).reshape(-1), step)


def write_config(writer: Any, config: Mapping[str, Any]) -> bool:
    """The options the run was guarded with (at step 0); the report judges the run by them."""
    return _write_json(writer, CONFIG_TAG, dict(config), 0)


def write_events(writer: Any, events: list[tuple[GradEvent, bool]], step: int) -> bool:
    """Events recorded since the last write, each with whether it passed the alert rate limit."""
    rows = [{**_row(e), "alerted": alerted} for e, alerted in events]
    return _write_json(writer, EVENTS_TAG, rows, step)


# events whose extra is written too: a rollback's cause, snapshot and batches; a replay's verdict; the
# ranks, hosts and devices of a replica divergence
_EXTRA_KINDS = ("rollback", "spike_skipped", "nonfinite", "replica_divergence")


def _row(event: GradEvent) -> dict[str, Any]:
    row = event.as_dict()
    extra = row.pop("extra")
    if event.kind in _EXTRA_KINDS:
        row["extra"] = json_safe(extra)
    return row


def write_summary(writer: Any, steps: int, log_every_n_steps: int | None, text: str | None = None) -> bool:
    """At the end of fit (at step ``steps``): the run's optimizer steps, its logging cadence and the
    guard's summary, so that a run that never reached a logging step still says how long it ran."""
    value = {"steps": int(steps), "log_every_n_steps": log_every_n_steps} | ({"text": text} if text else {})
    return _write_json(writer, SUMMARY_TAG, value, steps)


def write_layer_order(writer: Any, order: list[str], step: int) -> bool:
    """The layers in forward order (whenever it changes)."""
    return _write_json(writer, LAYER_ORDER_TAG, order, step)


def write_alert_text(writer: Any, event: GradEvent, message: str) -> None:
    """One rate-limited alert, as text for TensorBoard's Text tab."""
    writer.add_text(ALERTS_TAG, f"**{event.kind}** (step {event.step}): {message}", event.step)


def write_nonfinite_text(writer: Any, event: GradEvent) -> None:
    """One non-finite step, as text for TensorBoard's Text tab."""
    line = f"step {event.step} origin {event.origin} action {event.action} layers {','.join(event.layers)}"
    writer.add_text(NONFINITE_TAG, line, event.step)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so that strict JSON (and JavaScript) reads it.

    Example::

        >>> json_safe({"a": [1.0, float("nan")], "b": (float("inf"), "x")})
        {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------- reading
def _text_of(value: Any) -> str:
    """The string in a text or JSON tensor (a 0-d or 1-d array of bytes)."""
    flat = value.reshape(-1).tolist() if hasattr(value, "reshape") else [value]
    first = flat[0] if flat else b""
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


class RunDecoder:
    """Builds a :class:`RunData` from what a run's event data holds, however it was read (event
    files, or TensorBoard's data provider in the tab): feed every ``gradguard/`` scalar and tensor,
    then :meth:`finish`.

    Example::

        >>> import numpy as np
        >>> dec = RunDecoder()
        >>> dec.add_scalar("gradguard/total_norm", 0, 1.5)
        >>> dec.add_tensor(EVENTS_TAG, 0, np.array(json.dumps([{"kind": "nonfinite", "step": 0, "origin": "loss",
        ...     "action": "skipped", "layers": ["fc"], "alerted": True}]).encode()))
        >>> data = dec.finish()
        >>> data.nonfinite, data.alert_kinds
        ([{'step': 0, 'origin': 'loss', 'action': 'skipped', 'layers': 'fc'}], {'nonfinite': 1})
    """

    def __init__(self) -> None:
        self.data = RunData()
        self._texts: dict[str, list[tuple[int, str]]] = {}
        self._orders: list[tuple[int, list[str]]] = []
        self._summaries: list[tuple[int, dict[str, Any]]] = []
        self._events: list[dict[str, Any]] = []
        self._has_events = False

    def add_scalar(self, tag: str, step: int, value: float) -> None:
        if tag.startswith(METRIC_PREFIX):
            self.data.scalars.setdefault(tag, []).append((step, float(value)))

    def add_scalars(self, tag: str, points: list[tuple[int, float]]) -> None:
        """Take a whole series of one scalar tag at once, ``[(step, value)]``."""
        if tag.startswith(METRIC_PREFIX):
            self.data.scalars.setdefault(tag, []).extend(points)

    def add_tensor(self, tag: str, step: int, value: Any) -> None:
        """Take one tensor datum of the tab's plugin (``gradguard``) or of the text plugin."""
        if tag.endswith(_TEXT_SUFFIX) and tag.startswith(METRIC_PREFIX):
            self._texts.setdefault(tag[: -len(_TEXT_SUFFIX)], []).append((step, _text_of(value)))
        elif tag.startswith(PROFILE_PREFIX):
            values = [float(v) for v in value.reshape(-1).tolist()]
            self.data.profiles.setdefault(tag[len(PROFILE_PREFIX) :], []).append((step, values))
        elif tag == EVENTS_TAG:
            self._has_events = True
            self._events.extend(json.loads(_text_of(value)))
        elif tag == CONFIG_TAG:
            self.data.config = json.loads(_text_of(value))
        elif tag == LAYER_ORDER_TAG:
            self._orders.append((step, json.loads(_text_of(value))))
        elif tag == SUMMARY_TAG:
            self._summaries.append((step, json.loads(_text_of(value))))

    def finish(self) -> RunData:
        """The run's data, every series in step order."""
        data, texts = self.data, self._texts
        for series in texts.values():
            series.sort(key=lambda item: item[0])
        for tag, series in texts.items():  # 0.2.0: profiles as JSON text
            if tag.startswith(_LEGACY_PROFILE_PREFIX) and tag[len(_LEGACY_PROFILE_PREFIX) :] not in data.profiles:
                data.profiles[tag[len(_LEGACY_PROFILE_PREFIX) :]] = [(step, json.loads(text)) for step, text in series]
        for tag, points in data.scalars.items():  # a step written twice (a resumed run): the last one read
            data.scalars[tag] = sorted({step: value for step, value in points}.items())
        for profile in data.profiles.values():
            profile.sort(key=lambda item: item[0])
        self._events.sort(key=lambda e: e.get("step", 0))
        data.events = self._events
        orders = sorted(self._orders, key=lambda item: item[0]) or [
            (step, json.loads(text)) for step, text in texts.get(LAYER_ORDER_TAG, [])
        ]
        data.layer_order = list(orders[-1][1]) if orders else []
        if self._summaries:  # a resumed run wrote one per fit: the latest
            data.summary = dict(max(self._summaries, key=lambda item: item[0])[1])
        data.recorded_events = self._has_events
        if self._has_events:
            data.nonfinite = [_nonfinite_row(e) for e in data.events if e.get("kind") == "nonfinite"]
        else:  # 0.2.0: only the text lines
            data.nonfinite = [row for _, line in texts.get(NONFINITE_TAG, []) if (row := _parse_nonfinite(line))]
        if self._events and all("alerted" in e for e in self._events):
            for e in self._events:
                if e["alerted"]:
                    data.alert_kinds[e["kind"]] = data.alert_kinds.get(e["kind"], 0) + 1
        else:  # files from before `alerted`: the kinds of the alert texts
            for _, line in texts.get(ALERTS_TAG, []):
                m = re.match(r"\*\*(\w+)\*\*", line)
                if m:
                    data.alert_kinds[m.group(1)] = data.alert_kinds.get(m.group(1), 0) + 1
        return data


def _nonfinite_row(event: Mapping[str, Any]) -> dict[str, Any]:
    layers = event.get("layers") or []
    return {"step": int(event["step"]), "origin": str(event.get("origin")), "action": str(event.get("action")),
            "layers": ",".join(layers)}  # fmt: skip


def _parse_nonfinite(line: str) -> dict[str, Any] | None:
    m = re.match(r"step (\d+) origin (\S+) action (.+?) layers (.*)", line)
    if m is None:
        return None
    return {"step": int(m.group(1)), "origin": m.group(2), "action": m.group(3), "layers": m.group(4)}


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The "GradGuard" Custom Scalars category (tags are regular expressions)."""
    return {
        "GradGuard": {
            "total norm (before / after clipping, threshold)": [
                "Multiline",
                [r"gradguard/total_norm$", r"gradguard/total_norm_clipped$", r"gradguard/clip_threshold$"],
            ],
            "per-layer norms": ["Multiline", [r"gradguard/layer/.*"]],
            "per-timestep: log10 first/last ratio": ["Multiline", [r"gradguard/timestep/.*/log10_first_last"]],
            "per-timestep: horizon": ["Multiline", [r"gradguard/timestep/.*/horizon"]],
            "per-timestep: decay per step": ["Multiline", [r"gradguard/timestep/.*/decay_per_step"]],
            "events": [
                "Multiline",
                [r"gradguard/skipped_steps$", r"gradguard/nonfinite_steps$", r"gradguard/clipped_fraction$"],
            ],
        }
    }
