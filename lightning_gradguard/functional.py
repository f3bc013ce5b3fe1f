"""The functional API: every measurement and clip the guard performs, on plain tensors.

The classes (:class:`~lightning_gradguard.GuardCore`, the clippers, ``GradGuard``) are thin wrappers
over these functions, so what you compute here is what the callback logs.

Example::

    >>> import torch
    >>> from lightning_gradguard import functional as F
    >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    >>> F.grad_norms(grads).tolist(), F.total_norm(grads).item()
    ([5.0, 12.0], 13.0)
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gradguard.clip import (
    AGC,
    ClipContext,
    LayerNormClip,
    clip_grads_by_norm_,
    clip_grads_by_value_,
    unitwise_norms,
)
from lightning_gradguard.detect import nonfinite_tensors, origin_of
from lightning_gradguard.measure import combine_norms, grad_norms, group_norms, total_norm

__all__ = [
    "adaptive_clip_",
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "clip_layers_by_norm_",
    "combine_norms",
    "grad_norms",
    "group_norms",
    "nonfinite_tensors",
    "origin_of",
    "percentile_threshold",
    "total_norm",
    "unitwise_norms",
    "zclip_target",
]


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


def adaptive_clip_(params: Sequence[torch.nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> Tensor:
    """Unit-wise adaptive gradient clipping of ``p.grad`` for each of ``params``; as :class:`AGC`.

    Returns the number of units clipped (0-d tensor).

    Args:
        params: the parameters whose ``.grad`` is clipped in place (those without one are ignored).
        clip_factor: λ, ``> 0``.
        eps: the floor on weight norms, ``> 0``.

    Raises:
        ValueError: ``clip_factor`` or ``eps`` is not positive.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> w.grad = torch.tensor([3.0, 4.0])            # ‖G‖/‖W‖ = 1 > 0.01
        >>> int(adaptive_clip_([w])), [round(v, 4) for v in w.grad.tolist()]
        (1, [0.03, 0.04])
    """
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad if p.grad is not None]
    out = AGC(clip_factor, eps).clip_(ClipContext.of(grads, params=with_grad))
    assert out.clipped_units is not None
    return out.clipped_units


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


def zclip_target(norm: float, mean: float, std: float, z_threshold: float = 2.5) -> float:
    """ZClip's clipped norm ĝ for a total norm ``norm`` against the EMA ``mean`` and ``std``.

    ĝ = mean + (z_threshold² / z) · std when z = (norm − mean) / (std + 1e-6) exceeds ``z_threshold``;
    ``norm`` otherwise.

    Args:
        norm: this step's total norm.
        mean: the EMA mean μ.
        std: the EMA standard deviation σ.
        z_threshold: the z-score above which the norm is a spike.

    Raises:
        ZeroDivisionError: never for finite inputs (σ + 1e-6 > 0); documented for completeness.

    Example::

        >>> round(zclip_target(10.0, 1.0, 0.5), 4)
        1.1736
    """
    z = (norm - mean) / (std + 1e-6)
    return mean + (z_threshold**2 / z) * std if z > z_threshold else norm
