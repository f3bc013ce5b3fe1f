"""A guard's state: in its checkpoint (``state_dict``, version 2: the core's counters and statistics,
and each component's under ``"components"``; version 1 of 0.2.x and 0.3.x still loads) and in a
rollback's snapshot (the statistics that must go back with the weights). A mixin of
:class:`~lightning_gradguard.GuardCore`: the state belongs to the stages and components, assembled here
in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_gradguard.detectors import Detector, state_of

if TYPE_CHECKING:
    from lightning_gradguard.core.alerts import AlertRouter
    from lightning_gradguard.core.clipping import ClipStage
    from lightning_gradguard.core.component import GuardComponent
    from lightning_gradguard.core.decide import StepPolicy

__all__ = ["GuardState"]


class GuardState:
    """The checkpoint and snapshot state of a guard (see :class:`~lightning_gradguard.GuardCore`)."""

    policy: StepPolicy
    clipping: ClipStage
    alerts: AlertRouter
    detectors: list[Detector]
    components: list[GuardComponent]
    kind_counts: dict[str, int]
    steps: int
    empty_steps: int

    if TYPE_CHECKING:  # GuardCore's, GuardReadouts'

        def flush(self) -> None: ...

        @property
        def clipped_steps(self) -> int: ...

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, clipper and detector state, as plain values, and each component's under
        ``"components"`` (version 2; versions 0.2.x and 0.3.x wrote version 1, which still loads)."""
        self.flush()
        detected: dict[str, Any] = {"rate": {}, "spike": {}, "layers": {}} | {
            d.state_key: state_of(d) for d in self.detectors if d.state_key
        }
        # The format of 0.2.0 keeps the spike detector's per-layer EMA with the layers' state.
        spike = detected["spike"] = dict(detected["spike"])
        detected["layers"] = {**detected["layers"], "log_ema": spike.pop("log_ema", {})}
        components = {c.name: state for c in self.components if (state := c.state_dict())}
        return {
            "version": 2,
            "steps": self.steps,
            **self.policy.state_dict(),
            "clipped_steps": self.clipped_steps,
            "clip": self.clipping.state_dict(),
            **detected,
            "alerts": self.alerts.state_dict(),
            "kinds": dict(self.kind_counts),
            **({"empty_steps": self.empty_steps} if self.empty_steps else {}),
            "components": components,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys (older checkpoints) keep their defaults. A checkpoint
        of 0.2.x or 0.3.x (no ``"components"``) gives each built-in component its part of the flat state."""
        self.steps = int(state.get("steps", self.steps))
        self.empty_steps = int(state.get("empty_steps", 0))
        self.policy.load_state_dict(state)
        self.clipping.load_state_dict(state.get("clip", {}), int(state.get("clipped_steps", 0)), self.steps)
        layers = state.get("layers", {})  # the spike detector's per-layer EMA is kept there (see state_dict)
        detected = {**state, "spike": {**state.get("spike", {}), "log_ema": layers.get("log_ema", {})}}
        for detector in self.detectors:
            load = getattr(detector, "load_state_dict", None)
            if detector.state_key and callable(load):
                load(detected.get(detector.state_key, {}))
        self.alerts.load_state_dict(state.get("alerts", {}))
        self.kind_counts = {str(k): int(v) for k, v in dict(state.get("kinds", {})).items()}
        components = state.get("components")
        for c in self.components:
            if components is None:
                c.load_legacy(state)
            elif c.name in components:
                c.load_state_dict(components[c.name])

    def _snapshot_state(self) -> dict[str, Any]:
        """The guard's state a snapshot keeps: the clipper's and the detectors' statistics and each
        component's (its counters and events go on counting through a rollback)."""
        return {
            "clip": self.clipping.state_dict(),
            "detectors": {d.state_key: state_of(d) for d in self.detectors if d.state_key},
            "components": {c.name: c.snapshot_state() for c in self.components},
        }

    def _load_snapshot_state(self, state: dict[str, Any]) -> None:
        self.clipping.load_state_dict(state.get("clip", {}), self.clipping.clipped_steps, self.steps)
        saved = state.get("detectors", {})
        for detector in self.detectors:
            load = getattr(detector, "load_state_dict", None)
            if detector.state_key in saved and callable(load):
                load(saved[detector.state_key])
        kept = state.get("components", {})
        for c in self.components:
            if c.name in kept:
                c.load_snapshot_state(kept[c.name])
