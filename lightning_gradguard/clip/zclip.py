"""ZClip: the threshold follows an EMA of the total norm's mean and variance (z-score clipping).

Kumar et al. (2025), "ZClip: Adaptive Spike Mitigation for LLM Pre-Training". μ and σ² are host
floats fed from the guard's one read per step; a non-finite step never enters them. The rules are
:func:`zclip_target` and :func:`zclip_update`.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_gradguard._validate import check_int, check_number
from lightning_gradguard.clip.base import (
    _EPS,
    ClipContext,
    ClipOutcome,
    Clipper,
    scale_grads_,
)

__all__ = ["ZClip", "zclip_target", "zclip_update"]

_Norm = TypeVar("_Norm", float, Tensor)


class ZClip(Clipper):
    """Z-score clipping of spikes in the total norm (Kumar et al., 2025, "ZClip").

    Faithful to the authors' reference code (``zclip/zclip.py``, ``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``clip_factor=1``):

    * **Warm-up.** The first ``warmup_steps`` finite total norms are collected; then μ is their mean
      and σ² their population variance. During warm-up only ``max_norm`` clips, if given.
    * **After warm-up.** z = (g − μ) / (σ + 1e-6). If z > ``z_threshold`` the norm is clipped to
      ĝ = μ + (z_threshold² / z) · σ (the reciprocal rule: the bigger the spike, the harder the
      clip); otherwise ĝ = g.
    * **The statistics** then follow ĝ: μ ← αμ + (1−α)ĝ, then σ² ← ασ² + (1−α)(ĝ − μ)², with the
      updated μ.
    * ``max_norm`` caps the applied norm at min(ĝ, max_norm); the statistics still take ĝ.
    * The coefficient is ``applied / (g + 1e-6)``, applied only when g exceeds ``applied``.

    One difference, on purpose: non-finite norms never count toward the warm-up and never enter
    the statistics (the reference code's statistics stay NaN forever after one NaN step).

    ``gradguard/clip_threshold`` logs the norm above which a step would be clipped: after warm-up
    min(μ + z_threshold·(σ + 1e-6), max_norm), during warm-up ``max_norm`` (or inf).

    Cost: μ, σ² and the warm-up buffer are host floats, updated from the total norm that the guard
    reads in its one host sync per step (:meth:`observe`); the clip itself is a few 0-d device ops on
    the current norm against those floats, so there is no extra sync. Under
    ``on_nonfinite="warn"``, and with a fused optimizer that skips non-finite steps on the device
    (where the guard otherwise reads nothing on healthy non-logging steps), ZClip keeps the one sync
    per step, and why: its z-score of each step needs μ and σ² updated by every previous step, and
    keeping them on the device instead costs about 80 tiny float64 kernels per step (measured 1.40x
    on an H100 before they moved to the host). Use :class:`AutoClip` or :class:`NormClip` for a step
    with no host read. Used on its own (``clip_`` without a guard), it reads the norm itself: one
    sync per call.

    Args:
        alpha: the EMA's smoothing factor, in (0, 1).
        z_threshold: the z-score above which a norm is a spike, ``> 0``.
        warmup_steps: how many finite steps to collect before clipping, an int >= 1.
        max_norm: an absolute cap on the applied norm, ``> 0``, or None.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> import torch
        >>> clip = ZClip(warmup_steps=4)
        >>> for norm in (1.0, 1.2, 0.8, 1.0, 10.0):      # warm-up, then a spike
        ...     out = clip.clip_(ClipContext.of([torch.tensor([norm])]))
        >>> bool(out.clipped), round(out.coef.item(), 4)
        (True, 0.1014)
    """

    needs_host_stats = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
    ) -> None:
        self.alpha = check_number("alpha", alpha, minimum=0.0, maximum=1.0, strict_max=True)
        self.z_threshold = check_number("z_threshold", z_threshold, minimum=0.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.max_norm = check_number("max_norm", max_norm, minimum=0.0, allow_none=True)
        self._buffer: list[float] = []
        self._mean: float | None = None  # None until the warm-up ends
        self._var: float | None = None

    @property
    def initialized(self) -> bool:
        """Whether the warm-up is over."""
        return self._mean is not None

    @property
    def mean(self) -> float:
        """μ, the EMA of the (clipped) total norm (NaN before the warm-up ends)."""
        return self._mean if self._mean is not None else math.nan

    @property
    def var(self) -> float:
        """σ², the EMA of the variance (NaN before the warm-up ends)."""
        return self._var if self._var is not None else math.nan

    def _target(self, g: float) -> float:
        """ĝ for a finite norm g after the warm-up (the reciprocal rule)."""
        assert self._mean is not None and self._var is not None and self.z_threshold is not None
        return zclip_target(g, self._mean, math.sqrt(max(self._var, 0.0)), self.z_threshold)

    def observe(self, total: float, finite: bool) -> None:
        """Feed this step's pre-clip total norm to the statistics (the guard calls it after its sync)."""
        assert self.alpha is not None and self.warmup_steps is not None
        if not (finite and math.isfinite(total)):
            return
        if self._mean is None or self._var is None:
            self._buffer.append(total)
            if len(self._buffer) >= self.warmup_steps:
                n = len(self._buffer)
                self._mean = sum(self._buffer) / n
                self._var = sum((x - self._mean) ** 2 for x in self._buffer) / n
                self._buffer = []
            return
        self._mean, self._var = zclip_update(self._mean, self._var, self._target(total), self.alpha)

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        assert self.z_threshold is not None
        g = ctx.total.to(torch.float64)
        cap = self.max_norm if self.max_norm is not None else math.inf
        if self._mean is None or self._var is None:  # warm-up: clip_grad_norm_(max_norm) if given
            coef = torch.clamp(cap / (g + _EPS), max=1.0) if self.max_norm is not None else torch.ones_like(g)
            boundary = cap
        else:
            mean, std = self._mean, math.sqrt(max(self._var, 0.0))
            boundary = min(mean + self.z_threshold * (std + _EPS), cap)  # z > z_threshold <=> g > this
            g_hat = zclip_target(g, mean, std, self.z_threshold)
            applied = torch.clamp(g_hat, max=cap)
            coef = torch.where(g > applied, applied / (g + _EPS), 1.0)
        coef = torch.where(ctx.finite, coef, 1.0).to(ctx.total.dtype)
        scale_grads_(ctx.grads, coef, ctx.single_group)
        if not ctx.host_observed:  # used on its own: read the norm now (one sync)
            self.observe(float(ctx.total), bool(ctx.finite))
        clipped = ctx.total * coef if ctx.want_norm else None
        bit = coef < 1 if ctx.want_bit else None
        return ClipOutcome(coef, clipped, torch.full_like(ctx.total, boundary), clipped=bit)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": list(self._buffer),
            "mean": self._mean,
            "var": self._var,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("warmup_steps") not in (None, self.warmup_steps):
            raise ValueError(
                f"Expected a checkpointed ZClip with `warmup_steps`={self.warmup_steps}, "
                f"but got {state.get('warmup_steps')}."
            )
        self._buffer = [float(v) for v in state.get("buffer", [])]
        mean, var = state.get("mean"), state.get("var")
        self._mean = None if mean is None else float(mean)
        self._var = None if var is None else float(var)

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha!r}, z_threshold={self.z_threshold!r}, warmup_steps={self.warmup_steps!r}, "
            f"max_norm={self.max_norm!r})"
        )


def zclip_target(norm: _Norm, mean: float, std: float, z_threshold: float = 2.5) -> _Norm:
    """ZClip's clipped norm ĝ for a total norm ``norm`` against the EMA ``mean`` and ``std``.

    ĝ = mean + (z_threshold² / z) · std when z = (norm − mean) / (std + 1e-6) exceeds ``z_threshold``;
    ``norm`` otherwise. ``norm`` is a float (the host statistics) or a tensor (the clip on the
    device, with ``torch.where``: no host sync); :class:`ZClip` uses this function for both.

    Args:
        norm: this step's total norm.
        mean: the EMA mean μ.
        std: the EMA standard deviation σ.
        z_threshold: the z-score above which the norm is a spike.

    Example::

        >>> round(zclip_target(10.0, 1.0, 0.5), 4)
        1.1736
        >>> import torch
        >>> zclip_target(torch.tensor([10.0, 1.2], dtype=torch.float64), 1.0, 0.5).tolist()[1]
        1.2
    """
    z = (norm - mean) / (std + _EPS)
    if isinstance(norm, Tensor):
        spike = z > z_threshold
        return torch.where(spike, mean + (z_threshold**2 / torch.where(spike, z, 1.0)) * std, norm)  # type: ignore[return-value]
    return mean + (z_threshold**2 / z) * std if z > z_threshold else norm  # type: ignore[return-value,operator]


def zclip_update(mean: float, var: float, g_hat: float, alpha: float) -> tuple[float, float]:
    """ZClip's statistics after a step whose (clipped) norm is ``g_hat``: μ ← αμ + (1−α)ĝ, then
    σ² ← ασ² + (1−α)(ĝ − μ)², with the updated μ.

    Example::

        >>> zclip_update(1.0, 0.25, 2.0, 0.5)
        (1.5, 0.25)
    """
    mean = alpha * mean + (1 - alpha) * g_hat
    return mean, alpha * var + (1 - alpha) * (g_hat - mean) ** 2
