"""Clipping by value: :class:`ValueClip` clamps every element into ``[-max_value, max_value]``.

Exactly :func:`torch.nn.utils.clip_grad_value_`. It changes the gradient's direction whenever it
bites, and it is *deferred*: the guard applies it only once it knows that the step is finite.
"""

from __future__ import annotations

import math

import torch

from lightning_gradguard._validate import check_number
from lightning_gradguard.clip.base import (
    ClipContext,
    ClipOutcome,
    Clipper,
    _ones,
    clip_grads_by_value_,
)
from lightning_gradguard.primitives.norms import (
    grad_norms,
    total_norm,
)


class ValueClip(Clipper):
    """Clamp every gradient element into ``[-max_value, max_value]``, as ``clip_grad_value_``.

    Unlike norm clipping this changes the gradient's direction whenever it bites. It is *deferred*:
    applied only after the guard has found the step finite, so that it never turns an Inf into a
    finite value. On logging steps it costs one extra norm (and one extra host sync) to report the
    clipped norm.

    Args:
        max_value: the largest absolute value allowed, ``> 0``.

    Raises:
        ValueError: ``max_value`` is not positive.

    Example::

        >>> import torch
        >>> g = [torch.tensor([3.0, -0.5])]
        >>> out = ValueClip(1.0).clip_(ClipContext.of(g))
        >>> g[0].tolist()
        [1.0, -0.5]
    """

    deferred = True

    def __init__(self, max_value: float) -> None:
        self.max_value = check_number("max_value", max_value, minimum=0.0)

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        assert self.max_value is not None
        limit = self.max_value
        if ctx.inv_scale is not None:  # guarded against by the guard; kept exact for direct use
            raise ValueError(
                "Expected unscaled gradients for ValueClip, but got gradients still scaled by a GradScaler."
            )
        threshold = torch.full_like(ctx.total, limit)
        if not ctx.want_norm:
            bit = grad_norms(ctx.grads, math.inf).max() > limit if len(ctx.grads) else None
            clip_grads_by_value_(ctx.grads, limit)
            return ClipOutcome(_ones(ctx.total), None, threshold, clipped=bit)
        clip_grads_by_value_(ctx.grads, limit)
        clipped = total_norm(ctx.grads, ctx.norm_type).to(ctx.total.device)
        coef = torch.where(ctx.total > 0, clipped / ctx.total, torch.ones_like(ctx.total))
        return ClipOutcome(coef, clipped, threshold, clipped=coef < 1)
