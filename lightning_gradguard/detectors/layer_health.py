"""Per-layer health on logging steps: vanishing, dead and unused layers.

The detector owns its bookkeeping (:class:`LayerHealthState`: patience, once-per-layer reports) and
turns what it finds into events.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["LayerHealthDetector", "LayerHealthState"]


class LayerHealthDetector:
    """``vanishing``, ``dead`` and ``unused`` events from a logging step's per-layer norms.

    Steps with a non-finite gradient or loss are not looked at: their norms say nothing about health.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = LayerHealthDetector(vanish_threshold=1e-8, patience=1)
        >>> obs = Observation(4, 0, 1.0, True, False, logged=True, layer_norms={"a": 1.0, "b": 1e-12, "c": 0.0})
        >>> [(e.kind, e.layers) for e in det.detect(obs)]
        [('vanishing', ('b',)), ('dead', ('c',))]
    """

    headline = False
    state_key = "layers"

    def __init__(self, vanish_threshold: float = 1e-8, vanish_ratio: float | None = None, patience: int = 3) -> None:
        self.watch = LayerHealthState(vanish_threshold, vanish_ratio, patience)

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


class LayerHealthState:
    """Per-layer checks on logging steps: vanishing (with patience), dead and unused layers.

    * A layer whose norm is below ``vanish_threshold``, or whose ‖g‖/‖w‖ is below ``vanish_ratio``,
      on ``patience`` consecutive logging steps is *vanishing* (reported once, when it gets there;
      again only after it recovered). Exactly-zero gradients are *dead* instead.
    * A layer whose gradients are exactly zero is *dead*; a layer whose parameters require grad but
      got no gradient is *unused*. Each is reported once per layer.

    Example::

        >>> w = LayerHealthState(vanish_threshold=1e-8, vanish_ratio=None, patience=2)
        >>> w.update({"a": 1.0, "b": 1e-12}, {}), w.update({"a": 1.0, "b": 1e-12}, {})
        (([], [], []), (['b'], [], []))
    """

    def __init__(self, vanish_threshold: float = 1e-8, vanish_ratio: float | None = None, patience: int = 3) -> None:
        self.vanish_threshold = vanish_threshold
        self.vanish_ratio = vanish_ratio
        self.patience = patience
        self.below: dict[str, int] = {}
        self.reported_dead: set[str] = set()
        self.reported_unused: set[str] = set()

    def update(
        self, norms: Mapping[str, float], weight_norms: Mapping[str, float], unused: Sequence[str] = ()
    ) -> tuple[list[str], list[str], list[str]]:
        """Feed one logging step's per-layer norms; return (newly vanishing, newly dead, newly unused)."""
        vanishing, dead = [], []
        for name, v in norms.items():
            if not math.isfinite(v):
                continue
            if v == 0.0:
                self.below.pop(name, None)
                if name not in self.reported_dead:
                    self.reported_dead.add(name)
                    dead.append(name)
                continue
            w = weight_norms.get(name)
            low = v < self.vanish_threshold or (
                self.vanish_ratio is not None and w is not None and w > 0 and v / w < self.vanish_ratio
            )
            if low:
                self.below[name] = self.below.get(name, 0) + 1
                if self.below[name] == self.patience:
                    vanishing.append(name)
            else:
                self.below.pop(name, None)
        fresh_unused = [n for n in unused if n not in self.reported_unused]
        self.reported_unused.update(fresh_unused)
        return vanishing, dead, fresh_unused

    def state_dict(self) -> dict[str, Any]:
        return {
            "below": dict(self.below),
            "dead": sorted(self.reported_dead),
            "unused": sorted(self.reported_unused),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.below = {str(k): int(v) for k, v in dict(state.get("below", {})).items()}
        self.reported_dead = set(state.get("dead", []))
        self.reported_unused = set(state.get("unused", []))
