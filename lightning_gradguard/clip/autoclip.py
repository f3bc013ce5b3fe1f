"""AutoClip: the threshold is a percentile of the run's own history of total norms.

Seetharaman, Wichern, Pardo and Le Roux (2020), "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks". The window lives on the gradients' device and is updated with tensor
arithmetic (``torch.where`` on the step's finiteness): no host sync, and a non-finite step never
enters it. The rule is :func:`percentile_threshold`.
"""

from __future__ import annotations

import math
from typing import Any

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

__all__ = ["AutoClip", "percentile_threshold"]


def _state_tensor(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", copy=True)


class AutoClip(Clipper):
    """Clip the total norm to a percentile of the norms seen so far (Seetharaman et al., 2020).

    Each step appends its pre-clip total norm to the history, then clips to the ``percentile``-th
    percentile of the history, the current step included (the paper's Algorithm 1), with the
    coefficient of :func:`torch.nn.utils.clip_grad_norm_`. The percentile interpolates linearly
    between order statistics, as ``numpy.percentile`` does by default.

    Differences from the paper, on purpose:

    * the history is a window of the last ``history`` finite norms; the paper keeps all of them,
      which grows without bound over a long run;
    * non-finite norms (steps the guard skips) never enter the history.

    Cost: the window lives on the device; each step writes one entry and takes one ``nanquantile``
    over ``history`` values (a sort): no host sync, so with a fused optimizer a healthy non-logging
    step reads nothing on the host.

    Args:
        percentile: in (0, 100]. 10 (the paper's recommendation) clips most steps a little.
        history: the window length, an int >= 1.

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``history`` < 1.

    Example::

        >>> import torch
        >>> clip = AutoClip(percentile=50.0)
        >>> for norm in (1.0, 3.0):                       # history [1, 3]: median 2
        ...     g = [torch.tensor([norm])]
        ...     out = clip.clip_(ClipContext.of(g))
        >>> round(out.threshold.item(), 4), round(g[0].item(), 4)
        (2.0, 2.0)
    """

    def __init__(self, percentile: float = 10.0, history: int = 10_000) -> None:
        self.percentile = check_number("percentile", percentile, minimum=0.0, maximum=100.0)
        self.history = check_int("history", history, minimum=1)
        self._window: Tensor | None = None  # NaN where empty
        self._count: Tensor | None = None  # finite norms written so far (int64, device)

    def _ensure(self, like: Tensor) -> tuple[Tensor, Tensor]:
        assert self.history is not None
        if self._window is None or self._count is None:
            self._window = torch.full((self.history,), math.nan, dtype=torch.float32, device=like.device)
            self._count = torch.zeros((), dtype=torch.int64, device=like.device)
        elif self._window.device != like.device:
            self._window, self._count = self._window.to(like.device), self._count.to(like.device)
        return self._window, self._count

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        assert self.percentile is not None and self.history is not None
        window, count = self._ensure(ctx.total)
        total = ctx.total.to(torch.float32)
        pos = (count % self.history).reshape(1)
        current = window.index_select(0, pos)
        window.index_copy_(0, pos, torch.where(ctx.finite, total.reshape(1), current))
        self._count = count + ctx.finite.to(torch.int64)
        threshold = percentile_threshold(window, self.percentile)
        coef = torch.clamp(threshold / (total + _EPS), max=1.0)
        coef = torch.where(ctx.finite & torch.isfinite(threshold), coef, torch.ones_like(coef))
        scale_grads_(ctx.grads, coef, ctx.single_group)
        clipped = ctx.total * coef if ctx.want_norm else None
        return ClipOutcome(coef, clipped, threshold, clipped=coef < 1 if ctx.want_bit else None)

    @property
    def window(self) -> Tensor:
        """The finite norms in the window, oldest first (a CPU copy)."""
        if self._window is None or self._count is None:
            return torch.zeros(0)
        assert self.history is not None
        n = int(self._count)
        w = self._window.cpu()
        if n <= self.history:
            return w[:n].clone()
        start = n % self.history
        return torch.cat([w[start:], w[:start]])

    def state_dict(self) -> dict[str, Any]:
        return {"window": _state_tensor(self._window), "count": _state_tensor(self._count), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("history") not in (None, self.history):
            raise ValueError(
                f"Expected a checkpointed AutoClip with `history`={self.history}, but got {state.get('history')}."
            )
        self._window = state.get("window")
        self._count = state.get("count")

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile!r}, history={self.history!r})"


def percentile_threshold(norms: Tensor, percentile: float) -> Tensor:
    """AutoClip's threshold: the ``percentile``-th percentile of the finite ``norms``, interpolated linearly.

    Args:
        norms: the history of total norms (non-finite entries are ignored).
        percentile: in (0, 100].

    Raises:
        RuntimeError: from ``torch.nanquantile`` when ``percentile`` is outside [0, 100].

    Example::

        >>> import torch
        >>> percentile_threshold(torch.tensor([1.0, 2.0, 3.0, float("nan")]), 50.0).item()
        2.0
    """
    x = norms.float().flatten()
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, float("nan")))
    return torch.nanquantile(x, percentile / 100.0, interpolation="linear")
