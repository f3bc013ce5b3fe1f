"""Gradient spikes: a total norm far above its own recent history.

The statistics are :class:`~lightning_gradguard.detect.SpikeDetector`'s EMA of log(total norm); the
layers named are those that grew most against their own recent norms
(:meth:`~lightning_gradguard.detect.LayerWatch.grew_most`).
"""

from __future__ import annotations

from lightning_gradguard.detect import LayerWatch, SpikeDetector
from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["SpikeAlarm"]


class SpikeAlarm:
    """A ``spike`` event when a finite step's z-score of log(total norm) exceeds ``zscore``.

    Every finite step feeds the statistics; a spike costs one more host read, for the per-layer
    norms that say where it is.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> alarm = SpikeAlarm(3.0, SpikeDetector(warmup=3), LayerWatch())
        >>> for s, total in enumerate([1.0, 1.1, 0.9, 50.0]):
        ...     events = alarm.detect(Observation(s, 0, total, True, False, layers_now=lambda: {"fc": total}))
        >>> [(e.kind, e.origin) for e in events]
        [('spike', 'fc')]
    """

    headline = True
    state_key = "spike"

    def __init__(self, zscore: float, stats: SpikeDetector, layers: LayerWatch) -> None:
        self.zscore = zscore
        self.stats = stats
        self.layers = layers

    def detect(self, obs: Observation) -> list[GradEvent]:
        if not obs.finite:
            return []
        z = self.stats.score(obs.total)
        if not (z == z and z > self.zscore):
            return []
        top = self.layers.grew_most(obs.layers_now())
        step, total = obs.step, obs.total
        return [
            GradEvent(
                "spike",
                step=step,
                layers=tuple(top),
                origin=top[0] if top else None,
                value=z,
                message=f"GradGuard: gradient spike at step {step}: total norm {total:.4g} is {z:.1f} standard "
                f"deviations above its recent log-norm; grew most: {', '.join(top)}.",
                optimizer_idx=obs.optimizer_idx,
                extra={"total_norm": total},
            )
        ]

    def state_dict(self) -> dict[str, float]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.stats.load_state_dict(state)
