"""Detecting non-finite gradients and naming where they began.

Healthy steps cost one ``isfinite`` on the total norm (already on the device). Only on a faulty step
does the guard look at each tensor's norm, to list the layers with non-finite gradients and find the
*origin*: the non-finite layer that runs first in the backward pass, that is the last one in the
recorded forward order. Backpropagation carries a NaN from that layer to every layer before it, so
the origin is where the fault entered the gradient. A non-finite loss is reported as origin
``"loss"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["describe_nonfinite", "nonfinite_tensors", "origin_of"]


def nonfinite_tensors(norms: Tensor) -> list[int]:
    """Indices of the tensors whose norm is NaN or Inf (one host sync: fault path only).

    Args:
        norms: 1-D per-tensor norms.

    Raises:
        RuntimeError: never for a 1-D tensor; documented for completeness.

    Example::

        >>> import torch
        >>> nonfinite_tensors(torch.tensor([1.0, float("nan"), 2.0, float("inf")]))
        [1, 3]
    """
    return [int(i) for i in (~torch.isfinite(norms)).nonzero().flatten().tolist()]


def origin_of(layers_in_forward_order: Sequence[str], loss_nonfinite: bool) -> str | None:
    """The origin of a non-finite step.

    Args:
        layers_in_forward_order: the layers with non-finite gradients, in forward order.
        loss_nonfinite: whether the loss itself was non-finite.

    Raises:
        Nothing: an empty list gives None.

    Example::

        >>> origin_of(["embed", "rnn.l0", "head"], loss_nonfinite=False)
        'head'
        >>> origin_of(["embed", "head"], loss_nonfinite=True)
        'loss'
        >>> origin_of([], loss_nonfinite=False) is None
        True
    """
    if loss_nonfinite:
        return "loss"
    return layers_in_forward_order[-1] if layers_in_forward_order else None


def describe_nonfinite(
    step: int, layers: Sequence[str], origin: str | None, total: float, action: str, optimizer_idx: int = 0
) -> str:
    """A one-line message for a non-finite step.

    Example::

        >>> describe_nonfinite(4, ["a", "b"], "b", float("nan"), "skipped")
        "GradGuard: non-finite gradient at step 4 (total norm nan), origin 'b'; layers: a, b. Step skipped."
    """
    opt = f" of optimizer {optimizer_idx}" if optimizer_idx else ""
    where = f"origin '{origin}'" if origin else "origin unknown"
    shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
    listed = f"; layers: {shown}" if layers else ""
    verdict = {
        "skipped": "Step skipped.",
        "stopped": "Step skipped; stopping training.",
        "raised": "Raising.",
        "warned": "Step NOT skipped (on_nonfinite='warn').",
        "skipped by the GradScaler": "Step skipped by the GradScaler.",
    }.get(action, "")
    head = f"GradGuard: non-finite gradient at step {step}{opt} (total norm {total:g})"
    return f"{head}, {where}{listed}. {verdict}".strip()


