"""fp16 loss-scale collapse: the GradScaler keeps halving its scale because overflows recur."""

from __future__ import annotations

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["LossScaleDetector"]


class LossScaleDetector:
    """A ``loss_scale_collapse`` event on every step whose fp16 loss scale is below ``min_loss_scale``.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> [e.value for e in LossScaleDetector(1.0).detect(Observation(9, 0, 1.0, False, False, loss_scale=0.5))]
        [0.5]
    """

    headline = False
    state_key = None

    def __init__(self, min_loss_scale: float) -> None:
        self.min_loss_scale = min_loss_scale

    def detect(self, obs: Observation) -> list[GradEvent]:
        scale, step = obs.loss_scale, obs.step
        if not (scale > 0 and scale < self.min_loss_scale):  # 0: no scaler
            return []
        return [
            GradEvent(
                "loss_scale_collapse",
                step=step,
                value=scale,
                message=f"GradGuard: the fp16 loss scale fell to {scale:g} at step {step} (min_loss_scale="
                f"{self.min_loss_scale:g}): overflows keep recurring. Check for an fp16-unsafe op, lower the "
                "learning rate, or train in bf16.",
                optimizer_idx=obs.optimizer_idx,
            )
        ]
