"""A real skip under Hugging Face's Trainer: the weights, the optimizer's state and the LR scheduler all
left as they were.

The guard skips a step by setting every gradient of the optimizer to None (the core's skip): torch's
optimizers leave a parameter without a gradient alone, so its weights, its moments and its ``step``
count are untouched. The Trainer then still calls ``optimizer.step()`` (a no-op for those
parameters) and would step the LR scheduler, unless ``accelerator.optimizer_step_was_skipped``: the
signal accelerate raises when the fp16 GradScaler found an overflow, which the Trainer reads right
after ``on_optimizer_step``. :class:`SchedulerHold` raises that same signal (the
``AcceleratedOptimizer``'s ``_is_overflow``) on a step the guard skipped, in ``on_optimizer_step``,
after the optimizer's own step has set it (under fp16) and before the Trainer reads it; and lowers
it again on the next kept step where accelerate would not (no GradScaler).

So the decision must be on the host at every step: :class:`HostDecision` is a component whose
``needs_host`` tells the guard never to defer a step's read (a fused optimizer would otherwise be
skipped on the device, with the host learning of it only at the next logging step: too late for the
scheduler). One host read per step, the decision's.
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.core.component import GuardComponent

__all__ = ["HostDecision", "SchedulerHold", "inner_optimizer"]


class HostDecision(GuardComponent):
    """Reads every step's decision on the host (``needs_host``), so that a skipped step can hold the
    LR scheduler back in the same step. Holds no state and adds no metric."""

    name = "hf_host_decision"
    order = 1000
    needs_host = True


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (itself if it is not one)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer


class SchedulerHold:
    """Raises accelerate's "step was skipped" signal on a step the guard skipped, so that the Trainer
    does not step the LR scheduler (its state stays bit-identical), and lowers it after.

    Example::

        >>> class Accelerated:                     # what accelerate's AcceleratedOptimizer holds
        ...     _is_overflow, scaler = False, None
        >>> opt, hold = Accelerated(), SchedulerHold()
        >>> hold.supported(opt)
        True
        >>> hold.after_step(opt, skipped=True); opt._is_overflow
        True
        >>> hold.after_step(opt, skipped=False); opt._is_overflow
        False
    """

    def __init__(self) -> None:
        self._raised = False

    @staticmethod
    def supported(optimizer: Any) -> bool:
        """Whether ``optimizer`` carries the signal (an ``AcceleratedOptimizer``)."""
        return hasattr(optimizer, "_is_overflow")

    def after_step(self, optimizer: Any, skipped: bool) -> None:
        """Call in ``on_optimizer_step``: after ``optimizer.step()``, before the Trainer reads
        ``accelerator.optimizer_step_was_skipped``."""
        if not self.supported(optimizer):
            return
        if skipped:
            optimizer._is_overflow = True
            self._raised = True
        elif self._raised:
            # With a GradScaler, accelerate sets the signal itself on every step (an overflow is its to
            # report); without one nothing lowers it but us.
            if getattr(optimizer, "scaler", None) is None:
                optimizer._is_overflow = False
            self._raised = False
