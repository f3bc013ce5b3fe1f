"""The data of the GradGuard tab: tensor summaries under TensorBoard plugin name ``gradguard``.

Written by the TensorBoard sink on rank zero, read by the tab (through TensorBoard's data provider)
and by ``gradguard report`` (from the event files):

=====================================  ====================================================  =========
tag                                    value                                                 when
=====================================  ====================================================  =========
``gradguard/config``                   JSON: the thresholds the tab draws in its legends     fit start
``gradguard/profile/<name>``           float32 vector: a tracked sequence's per-timestep     logging
                                       gradient norms (index 0 = earliest timestep)          steps
``gradguard/events``                   JSON: a list of events (kind, step, origin, layers,   logging
                                       message, action), every event since the last write    steps
=====================================  ====================================================  =========

Per-layer norms are the scalars ``gradguard/layer/<name>``, and the layer order the text
``gradguard/layer_order``, as before. Older event files hold each profile as JSON text
(``gradguard/timestep_profile/<name>``); the report still reads those.

TensorBoard keeps only 10 samples of each tensor series of a plugin it does not know, unless told
otherwise: the tab's loader sets ``--samples_per_plugin gradguard=0`` (keep all) unless the user
chose a value.

Cost: one small protobuf per tracked sequence per logging step (it replaces the JSON text of
0.2.0), plus one per logging step that recorded events.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["CONFIG_TAG", "EVENTS_TAG", "PLUGIN_NAME", "PROFILE_PREFIX", "json_safe", "write_json", "write_vector"]

PLUGIN_NAME = "gradguard"
CONFIG_TAG = "gradguard/config"
EVENTS_TAG = "gradguard/events"
PROFILE_PREFIX = "gradguard/profile/"


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


def write_vector(writer: Any, tag: str, values: Any, step: int) -> bool:
    """Write a float32 vector summary; False when ``writer`` cannot write summaries."""
    import numpy as np

    return _add(writer, tag, np.asarray(values, dtype=np.float32).reshape(-1), step)


def write_json(writer: Any, tag: str, obj: Any, step: int) -> bool:
    """Write ``obj`` as a JSON string summary (non-finite floats as null); False when it cannot."""
    return _add(writer, tag, json.dumps(json_safe(obj), allow_nan=False), step)


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
