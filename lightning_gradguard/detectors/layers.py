"""Per-layer health on logging steps: vanishing, dead and unused layers.

The bookkeeping (patience, once-per-layer reports, each layer's EMA) is
:class:`~lightning_gradguard.detect.LayerWatch`; this module turns what it finds into events.
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.detect import LayerWatch
from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["LayerHealthDetector"]


class LayerHealthDetector:
    """``vanishing``, ``dead`` and ``unused`` events from a logging step's per-layer norms.

    Steps with a non-finite gradient or loss are not looked at: their norms say nothing about health.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = LayerHealthDetector(LayerWatch(vanish_threshold=1e-8, patience=1))
        >>> obs = Observation(4, 0, 1.0, True, False, logged=True, layer_norms={"a": 1.0, "b": 1e-12, "c": 0.0})
        >>> [(e.kind, e.layers) for e in det.detect(obs)]
        [('vanishing', ('b',)), ('dead', ('c',))]
    """

    headline = False
    state_key = "layers"

    def __init__(self, watch: LayerWatch) -> None:
        self.watch = watch

    def detect(self, obs: Observation) -> list[GradEvent]:
        if not obs.logged or obs.nonfinite:
            return []
        vanishing, dead, unused = self.watch.update(obs.layer_norms, obs.weight_norms, obs.unused)
        step, idx = obs.step, obs.optimizer_idx
        events = []
        if vanishing:
            rule = f"below vanish_threshold={self.watch.vanish_threshold:g}"
            if self.watch.vanish_ratio is not None:
                rule += f" or ‖g‖/‖w‖ < vanish_ratio={self.watch.vanish_ratio:g}"
            events.append(
                GradEvent(
                    "vanishing",
                    step=step,
                    layers=tuple(vanishing),
                    value=min(obs.layer_norms[n] for n in vanishing),
                    message=f"GradGuard: vanishing gradient at step {step} in {', '.join(vanishing)}: {rule} for "
                    f"{self.watch.patience} logging steps. Check initialisation and normalisation; for RNNs a "
                    "gated cell (LSTM/GRU).",
                    optimizer_idx=idx,
                )
            )
        if dead:
            events.append(
                GradEvent(
                    "dead",
                    step=step,
                    layers=tuple(dead),
                    value=0.0,
                    message=f"GradGuard: dead layers at step {step}: {', '.join(dead)} got exactly zero gradients "
                    "(dead ReLUs, a zero multiplier, or a detached path). Check the wiring.",
                    optimizer_idx=idx,
                )
            )
        if unused:
            events.append(
                GradEvent(
                    "unused",
                    step=step,
                    layers=tuple(unused),
                    message=f"GradGuard: unused layers at step {step}: {', '.join(unused)} require grad but got "
                    "no gradient. Freeze them (requires_grad=False) or check the forward pass.",
                    optimizer_idx=idx,
                )
            )
        return events

    def state_dict(self) -> dict[str, Any]:
        return self.watch.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch.load_state_dict(state)
