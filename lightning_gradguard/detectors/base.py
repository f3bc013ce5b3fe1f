"""The detector protocol: a detector takes one step's host values and returns events.

A detector is a small object with a :meth:`Detector.detect` method. The guard calls every detector,
in order, once per settled step, with an :class:`Observation`: host floats that the step's one host
read already brought back, plus a lazy way to get per-layer norms on a step that did not log them.
A detector owns its thresholds, its state and the text of its messages; it records nothing
itself: the guard records what it returns.

Adding a detector means adding a module here and listing it in :func:`default_detectors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from lightning_gradguard.events import GradEvent

__all__ = ["Detector", "Observation"]

_NONE: Mapping[str, Any] = MappingProxyType({})  # shared, read-only: no allocation per step


class Observation:
    """One settled step, on the host.

    Attributes:
        step: the optimizer step.
        optimizer_idx: which optimizer.
        total: the total gradient norm before clipping.
        finite: no fp16 overflow and no non-finite gradient or loss.
        nonfinite: a non-finite gradient or loss that no GradScaler handles.
        loss_scale: the fp16 GradScaler's scale (0.0 without one).
        logged: a logging step: the fields below are filled.
        layer_norms: each layer's norm before clipping (logging steps).
        weight_norms: each layer's weight norm (logging steps with ``vanish_ratio``).
        unused: layers whose parameters require grad but got no gradient (logging steps).
        timestep_summaries: each tracked sequence's profile summary (logging steps).
        layers_now: per-layer norms on any step, at the cost of one more host read.
        updates: logging steps with ``track_updates``: ``{"total": ‖ΔW‖/‖W‖, "layers": {layer: ratio},
            "sqrt_v_min": {layer: smallest √v}}`` (empty otherwise).
        spike_z: the guard's z-score of log(total norm) against its spike statistic (NaN without one).
        extra: what a component measured for its own detectors (filled by its ``observe`` hook).
    """

    # A plain class with slots: one is made per step, and shared empty defaults allocate nothing.
    __slots__ = (
        "extra", "finite", "layer_norms", "layers_now", "logged", "loss_scale", "nonfinite", "optimizer_idx",
        "spike_z", "step", "timestep_summaries", "total", "unused", "updates", "weight_norms",
    )  # fmt: skip

    def __init__(
        self,
        step: int,
        optimizer_idx: int,
        total: float,
        finite: bool,
        nonfinite: bool,
        loss_scale: float = 0.0,
        *,
        logged: bool = False,
        layer_norms: Mapping[str, float] = _NONE,
        weight_norms: Mapping[str, float] = _NONE,
        unused: Sequence[str] = (),
        timestep_summaries: Mapping[str, Mapping[str, float]] = _NONE,
        layers_now: Callable[[], dict[str, float]] = dict,
        updates: Mapping[str, Any] = _NONE,
    ) -> None:
        self.step = step
        self.optimizer_idx = optimizer_idx
        self.total = total
        self.finite = finite
        self.nonfinite = nonfinite
        self.loss_scale = loss_scale
        self.logged = logged
        self.layer_norms = layer_norms
        self.weight_norms = weight_norms
        self.unused = unused
        self.timestep_summaries = timestep_summaries
        self.layers_now = layers_now
        self.updates = updates
        self.spike_z = math.nan
        self.extra: dict[str, Any] = {}


@runtime_checkable
class Detector(Protocol):
    """What the guard asks of a detector.

    Attributes:
        headline: its events become the step's ``StepReport.event`` (per-step alarms such as a
            spike), rather than only landing in ``guard.events``.
        state_key: the key of its state in the guard's ``state_dict`` (None: stateless).

    Example: a detector of total norms above 100, in a dozen lines::

        >>> from lightning_gradguard.events import GradEvent
        >>> class Over100:
        ...     headline, state_key = True, None
        ...     def detect(self, obs):
        ...         if obs.finite and obs.total > 100:
        ...             return [GradEvent("exploding", step=obs.step, value=obs.total, message="> 100")]
        ...         return []
        >>> isinstance(Over100(), Detector)
        True
        >>> [e.kind for e in Over100().detect(Observation(3, 0, total=250.0, finite=True, nonfinite=False))]
        ['exploding']
    """

    @property
    def headline(self) -> bool: ...

    @property
    def state_key(self) -> str | None: ...

    def detect(self, obs: Observation) -> list[GradEvent]: ...


def state_of(detector: Detector) -> dict[str, Any]:
    """A detector's state (``{}`` for a stateless one)."""
    fn = getattr(detector, "state_dict", None)
    return fn() if callable(fn) else {}
