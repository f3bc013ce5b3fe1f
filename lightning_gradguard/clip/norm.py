"""Clipping by norm: :class:`NormClip` (the total norm) and :class:`LayerNormClip` (each layer).

:class:`NormClip` rescales all gradients together so that their total norm is at most ``max_norm``:
g ← g · min(1, max_norm / (‖g‖ + 1e-6)), exactly :func:`torch.nn.utils.clip_grad_norm_`. It keeps the
gradient's direction and only changes its length (Pascanu, Mikolov and Bengio, 2013, "On the
difficulty of training recurrent neural networks"). Its coefficient is exactly 1 when the total
norm is not finite (``torch.where`` on the device), so a non-finite step stays non-finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradguard._validate import check_number
from lightning_gradguard.clip.base import (
    _EPS,
    ClipContext,
    ClipOutcome,
    Clipper,
    _ones,
    _own_total,
    clip_grads_by_norm_,
    scale_grads_,
)
from lightning_gradguard.primitives.norms import (
    combine_norms,
    grad_norms,
    group_norms,
)


class NormClip(Clipper):
    """Clip the total gradient norm to ``max_norm``, as :func:`torch.nn.utils.clip_grad_norm_`.

    Args:
        max_norm: the largest total norm allowed, ``> 0``.
        norm_type: the norm's order, ``> 0`` (``float('inf')`` allowed).

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` is not positive.
        TypeError: either is not a number.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> w.grad = torch.full((4,), 2.0)          # total norm 4
        >>> clip = NormClip(max_norm=1.0)
        >>> out = clip.clip_(ClipContext.of([w.grad], want_norm=True))
        >>> round(out.clipped_total.item(), 4)
        1.0
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_number("max_norm", max_norm, minimum=0.0)
        self.norm_type = check_number("norm_type", norm_type, minimum=0.0, allow_inf=True)

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        assert self.max_norm is not None and self.norm_type is not None
        own_total = ctx.total if self.norm_type == ctx.norm_type else _own_total(ctx, self.norm_type)
        coef = clip_grads_by_norm_(ctx.grads, self.max_norm, own_total, ctx.finite, ctx.single_group)
        bit = coef < 1 if ctx.want_bit else None
        if not ctx.want_norm:  # a non-logging step: no kernel for what only the metrics need
            return ClipOutcome(coef, clipped=bit)
        return ClipOutcome(coef, ctx.total * coef, torch.full_like(ctx.total, self.max_norm), clipped=bit)


class LayerNormClip(Clipper):
    """Clip each layer's gradient norm to ``max_norm`` separately.

    Each layer (as the guard names layers: a module's own parameters; RNNs per stacked layer and
    direction) gets its own coefficient ``min(1, max_norm / (‖g_layer‖ + 1e-6))``, the formula of
    :func:`torch.nn.utils.clip_grad_norm_` applied per layer. Each layer keeps its direction; the
    direction of the whole gradient changes when some layers are clipped and others not. Logged:
    ``gradguard/clipped_units``, the number of layers clipped.

    Cost: the per-tensor norms the guard already has, one scatter to layers, one gather back and one
    ``_foreach_mul_``; no host sync.

    Args:
        max_norm: the largest norm allowed per layer, ``> 0``.
        norm_type: the norm's order, ``> 0`` (``float('inf')`` allowed).

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` is not positive.

    Example::

        >>> import torch
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]   # layer norms 5 and 0.5
        >>> out = LayerNormClip(max_norm=1.0).clip_(ClipContext.of(g))
        >>> [round(v, 4) for v in g[0].tolist()], g[1].tolist(), int(out.clipped_units)
        ([0.6, 0.8], [0.30000001192092896, 0.4000000059604645], 1)
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_number("max_norm", max_norm, minimum=0.0)
        self.norm_type = check_number("norm_type", norm_type, minimum=0.0, allow_inf=True)

    def clip_(self, ctx: ClipContext) -> ClipOutcome:

        assert self.max_norm is not None and self.norm_type is not None
        if self.norm_type == ctx.norm_type:
            norms = ctx.norms
        else:
            if ctx.sharded:
                _own_total(ctx, self.norm_type)  # raises: norms of shards need the guard's norm type
            norms = grad_norms(ctx.grads, self.norm_type).to(ctx.norms.device)
            if ctx.inv_scale is not None:
                norms = norms * ctx.inv_scale
        index = ctx.layer_index()
        layer_norms = group_norms(norms, index, len(ctx.layer_names), self.norm_type)
        layer_coef = torch.clamp(self.max_norm / (layer_norms + _EPS), max=1.0)
        layer_coef = torch.where(ctx.finite, layer_coef, torch.ones_like(layer_coef))
        per_tensor = layer_coef[index]
        scale_grads_(ctx.grads, per_tensor.unbind())
        hit = layer_coef < 1
        clipped_total = None
        if ctx.want_norm:
            clipped_total = combine_norms(ctx.norms * per_tensor, ctx.norm_type)
        coef = clipped_total / ctx.total if clipped_total is not None else _ones(ctx.total)
        coef = torch.where(ctx.total > 0, coef, torch.ones_like(coef)) if clipped_total is not None else coef
        return ClipOutcome(
            coef,
            clipped_total,
            torch.full_like(ctx.total, self.max_norm),
            clipped=hit.any(),
            clipped_units=hit.sum(),
        )


def clip_layers_by_norm_(
    grads: Sequence[Tensor], layer_of: Sequence[int], max_norm: float, norm_type: float = 2.0
) -> Tensor:
    """Clip each layer (the gradients sharing a ``layer_of`` id) to ``max_norm``; as :class:`LayerNormClip`.

    Returns the number of layers clipped (0-d tensor).

    Args:
        grads: the gradients, clipped in place.
        layer_of: the layer id of each gradient (same order).
        max_norm: the largest norm allowed per layer, ``> 0``.
        norm_type: the norm's order.

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` is not positive.

    Example::

        >>> import torch
        >>> g = [torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([0.5])]
        >>> int(clip_layers_by_norm_(g, [0, 0, 1], 1.0)), [round(t.item(), 4) for t in g]
        (1, [0.6, 0.8, 0.5])
    """
    names = [str(i) for i in range(max(layer_of) + 1)]
    ctx = ClipContext.of(grads, norm_type, layer_of=list(layer_of), layer_names=names)
    out = LayerNormClip(max_norm, norm_type).clip_(ctx)
    assert out.clipped_units is not None
    return out.clipped_units
