"""Exploding gradients: the total norm before clipping above a fixed threshold.

The remedy it names is clipping by norm (Pascanu, Mikolov and Bengio, 2013).
"""

from __future__ import annotations

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["ExplodingDetector"]


class ExplodingDetector:
    """An ``exploding`` event when a finite step's total norm exceeds ``threshold``.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> [e.value for e in ExplodingDetector(10.0).detect(Observation(5, 0, 12.5, True, False))]
        [12.5]
    """

    headline = True
    state_key = None

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold

    def detect(self, obs: Observation) -> list[GradEvent]:
        if self.threshold is None or not obs.finite or not obs.total > self.threshold:
            return []
        step, total = obs.step, obs.total
        return [
            GradEvent(
                "exploding",
                step=step,
                value=total,
                message=f"GradGuard: exploding gradient at step {step}: total norm {total:.4g} > "
                f"explode_threshold {self.threshold:g}. Consider NormClip(max_norm=...) or ZClip().",
                optimizer_idx=obs.optimizer_idx,
            )
        ]
