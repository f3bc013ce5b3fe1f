"""The clipping stage of a step: the clipper (:mod:`~lightning_gradguard.clip`) applied on the
device, and the counts of what it did.

* A clipper that is safe on non-finite input (every one but :class:`~lightning_gradguard.ValueClip`)
  runs before the step's host read, with no sync: it leaves a non-finite step untouched itself.
* A *deferred* clipper runs after the read, and only on a finite step.
* A clipper with host statistics (:class:`~lightning_gradguard.ZClip`) is fed the step's total norm
  after the read (:meth:`ClipStage.observe`).

On logging steps the clipped total, the coefficient, the threshold and the clipped units join the
step's host read by name (:data:`CLIP_VALUES`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.clip import ClipContext, ClipOutcome, Clipper
from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.primitives.layout import OptimizerLayout
from lightning_gradguard.primitives.norms import device_constant

__all__ = ["CLIP_VALUES", "ClipStage"]

CLIP_VALUES = ("total_norm_clipped", "clip_coef", "clip_threshold", "clipped_units")
CLIP_LEVEL = "clip_level"  # in the step's HostRead: 1.0 untouched, below 1 clipped


class ClipStage:
    """Applies ``clip`` to each step and counts the steps it changed.

    Example::

        >>> from lightning_gradguard import NormClip
        >>> ClipStage(NormClip(1.0)).needs_host, ClipStage(None).clipped_steps
        (False, 0)
    """

    def __init__(self, clip: Clipper | None) -> None:
        self.clip = clip
        self._device_count: Tensor | None = None  # deferred clippers: steps clipped, on the device
        self._host_count = 0  # other clippers: steps clipped, read with each step's flags
        self._log_mark = (0, 0)  # (steps, clipped steps) at the last logging step
        self._checked: set[int] = set()  # layouts whose parameter placements the clipper accepted

    @property
    def needs_host(self) -> bool:
        """Whether every step needs its host read (a deferred clipper, or one with host statistics)."""
        return self.clip is not None and (self.clip.deferred or self.clip.needs_host_stats)

    def context(self, m: Measurement, layout: OptimizerLayout, norm_type: float, is_log: bool) -> ClipContext | None:
        """The clipper's view of the step (None without a clipper).

        Raises:
            GradGuardError: a deferred clipper on gradients still scaled by the GradScaler.
        """
        if self.clip is None:
            return None
        if id(layout) not in self._checked:
            self.check(layout)
        if m.inv_scale is not None and self.clip.deferred:
            raise GradGuardError(self._scaled_refusal())
        params, layer_of, names = layout.subset(m.owners)
        return ClipContext(
            m.grads,
            m.norms,
            m.total,
            m.finite,
            norm_type,
            is_log,
            params=params,
            layer_of=layer_of,
            layer_names=layout.layer_names,
            param_names=names,
            inv_scale=m.inv_scale,
            sharded=m.sharded,
            single_group=m.single_group,
            host_observed=self.clip.needs_host_stats,
            want_bit=False,
            global_norms=m.global_norms if m.sharded else None,
            _index={"layer": layout.index(m.owners, m.norms.device)[0]},
        )

    def _scaled_refusal(self) -> str:
        return (
            f"GradGuard cannot apply {self.clip!r} to gradients that are still scaled by the GradScaler (a fused "
            "optimizer unscales inside step(), after the guard). Use NormClip, which is exact on scaled gradients, "
            "a non-fused optimizer, or call scaler.unscale_(optimizer) before the guard."
        )

    def check_scaled(self, optimizers: Sequence[torch.optim.Optimizer], scaler: Any) -> None:
        """Refuse, before the first step, a deferred clipper (ValueClip) with a GradScaler and a fused
        optimizer: its gradients are still scaled when the guard sees them. The same rule as the
        step's own check, said once.

        Raises:
            ValueError: naming the clipper and what to use instead.
        """
        if scaler is None or self.clip is None or not self.clip.deferred:
            return
        if not bool(getattr(scaler, "is_enabled", lambda: True)()):
            return
        if any(getattr(opt, "_step_supports_amp_scaling", False) for opt in optimizers):
            raise ValueError(self._scaled_refusal())

    def check(self, layout: OptimizerLayout) -> None:
        """Let the clipper refuse the optimizer's parameter placements (before the first step).

        Raises:
            ValueError: from the clipper, naming the parameter and its placement.
        """
        if self.clip is not None:
            layers = [layout.layer_names[i] for i in layout.param_layer]
            self.clip.check_placements(layout.param_names, layers, layout.params)
        self._checked.add(id(layout))

    def clip_now(self, ctx: ClipContext | None, m: Measurement, read: HostRead) -> Tensor:
        """Apply a non-deferred clipper before the read; return the step's clip level (0-d float32
        on the device): 1.0 when nothing was clipped, below 1 when something was."""
        one = device_constant(1.0, m.zero.device)
        if ctx is None or self.clip is None or self.clip.deferred:
            return one
        outcome = self.clip.clip_(ctx)
        if ctx.want_norm:
            read.put_each(CLIP_VALUES, _values(outcome, m.total))
        if outcome.clipped is not None:
            return torch.where(outcome.clipped.to(m.zero.device), m.zero, one)
        coef = outcome.coef.to(m.zero.device)  # "clipped" is "coef < 1": read the coefficient itself
        return coef if coef.dtype == torch.float32 else torch.where(coef < 1, m.zero, one)

    def observe(self, total: float, finite: bool, level: float) -> None:
        """After the read: count a clipped step (``level`` below 1), and feed a clipper's host statistics."""
        self._host_count += int(level < 1)
        if self.clip is not None and self.clip.needs_host_stats:
            self.clip.observe(total, finite)

    def clip_late(self, ctx: ClipContext | None, finite: bool) -> HostRead | None:
        """Apply a deferred clipper after the read, on a finite step. On a logging step its values
        cost one more read (documented on :class:`~lightning_gradguard.ValueClip`); returned here."""
        if ctx is None or self.clip is None or not self.clip.deferred or not finite:
            return None
        outcome = self.clip.clip_(ctx)
        bit = (outcome.clipped if outcome.clipped is not None else outcome.coef < 1).to(torch.int64)
        # Keep the counter on the gradients' device: adding a device bit to a CPU counter (as restored
        # from a checkpoint) would be a device-to-host copy, i.e. a host sync, on every step.
        count = self._device_count
        self._device_count = bit if count is None else count.to(bit.device) + bit
        if not ctx.want_norm:
            return None
        late = HostRead(dtype=ctx.total.dtype)
        late.put_each(CLIP_VALUES, _values(outcome, ctx.total))
        late.put_each(("clipped_on_device",), self._device_count.to(ctx.total.dtype).reshape(1))  # exact < 2**24
        late.read()
        # the device count rides in the same read: folded into the host count, so that the logging
        # step's clipped_fraction costs no second read
        self._host_count += int(late["clipped_on_device"])
        self._device_count = None
        return late

    @property
    def clipped_steps(self) -> int:
        """Steps the clipper changed (a deferred clipper's count costs one host read)."""
        return self._host_count + (0 if self._device_count is None else int(self._device_count.item()))

    def metrics(self, values: HostRead | None, total: float, steps: int, prefix: str) -> dict[str, float]:
        """The clip metrics of a logging step, from ``values`` (None: the clipper did not run)."""
        if self.clip is None:
            return {f"{prefix}clip_coef": 1.0}

        def value(name: str, default: float) -> float:
            return values.get(name, default) if values is not None else default

        out = {f"{prefix}total_norm_clipped": value("total_norm_clipped", total)}
        out[f"{prefix}clip_coef"] = value("clip_coef", 1.0)
        threshold, units = value("clip_threshold", math.nan), value("clipped_units", 0.0)
        if not math.isnan(threshold):
            out[f"{prefix}clip_threshold"] = threshold
        count, (mark_steps, mark_count) = self.clipped_steps, self._log_mark
        since = steps - mark_steps
        out[f"{prefix}clipped_fraction"] = (count - mark_count) / since if since else 0.0
        self._log_mark = (steps, int(count))
        if not math.isnan(units):
            out[f"{prefix}clipped_units"] = units
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.clip.state_dict() if self.clip is not None else {}

    def load_state_dict(self, clip_state: dict[str, Any], clipped_steps: int, steps: int) -> None:
        self._device_count = None
        self._host_count = clipped_steps
        self._log_mark = (steps, clipped_steps)
        if self.clip is not None and clip_state:
            self.clip.load_state_dict(clip_state)


def _values(outcome: ClipOutcome, total: Tensor) -> Tensor:
    """[clipped total, coef, threshold, clipped units] in :data:`CLIP_VALUES` order, on the device."""
    nan = torch.full_like(total, math.nan)
    parts = [
        outcome.clipped_total if outcome.clipped_total is not None else total,
        outcome.coef,
        outcome.threshold if outcome.threshold is not None else nan,
        outcome.clipped_units if outcome.clipped_units is not None else nan,
    ]
    return torch.stack([p.to(total.device, total.dtype) for p in parts])
