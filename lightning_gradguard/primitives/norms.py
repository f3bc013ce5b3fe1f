"""Norm math on gradient lists, shared by every stage: per-tensor, total, per-group and across shards.

The hot path mirrors what :func:`torch.nn.utils.clip_grad_norm_` does inside: one
``torch._foreach_norm`` call per (device, dtype) group gives every tensor's norm, and the total and
per-layer norms are reductions of that vector on the device. Nothing here calls ``.item()``.

The norms are accumulated in float32 (float64 for float64 gradients), so fp16 and bf16 gradients
do not overflow while being measured. A gradient whose norm overflows float32 reads as ``inf``,
exactly as it would for ``clip_grad_norm_``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype


def _acc_dtype(t: Tensor) -> torch.dtype:
    if t.dtype.is_complex:  # the norm of complex entries is real; torch wants a complex accumulator
        return t.dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_real(norms: Tensor, acc: torch.dtype) -> Tensor:
    return norms.double() if acc in (torch.float64, torch.complex128) else norms.float()


def grad_norms(grads: Sequence[Tensor], norm_type: float = 2.0, single_group: bool = False) -> Tensor:
    """Return a 1-D tensor with the ``norm_type`` norm of every tensor in ``grads``.

    The result lives on the device of the first gradient. Gradients on several devices or of several
    dtypes are grouped, as ``clip_grad_norm_`` does, with one ``_foreach_norm`` per group.

    Args:
        grads: the gradient tensors (dense).
        norm_type: the norm's order, ``> 0``; ``float('inf')`` for the max-norm.
        single_group: the caller knows that every tensor has the same device and dtype (skips the
            grouping pass).

    Raises:
        RuntimeError: from torch, for sparse tensors or an invalid ``norm_type``.

    Example::

        >>> import torch
        >>> grad_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])]).tolist()
        [5.0, 2.0]
        >>> grad_norms([torch.tensor([3.0, -4.0])], float("inf")).tolist()
        [4.0]
    """
    if len(grads) == 0:
        return torch.zeros(0)
    if single_group:
        acc = _acc_dtype(grads[0])
        norms = torch._foreach_norm(list(grads), norm_type, dtype=acc)
        return _as_real(torch.stack(norms), acc)
    groups = group_by_device_and_dtype(grads)
    if len(groups) == 1:
        acc = _acc_dtype(grads[0])
        norms = torch._foreach_norm(list(grads), norm_type, dtype=acc)
        return _as_real(torch.stack(norms), acc)
    device = grads[0].device
    out = torch.empty(len(grads), dtype=torch.float32, device=device)
    for group, index in groups.values():
        norms = torch._foreach_norm(group, norm_type, dtype=_acc_dtype(group[0]))
        out[torch.tensor(index, device=device)] = torch.stack(norms).to(device, torch.float32)
    return out


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[Any, tuple[list[Tensor], list[int]]]:
    """Split ``tensors`` into (tensors, original indices) per (device, dtype).

    Uses the C++ grouping helper that ``clip_grad_norm_`` uses, so the hot path has no Python loop
    over the parameters.
    """
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)  # type: ignore[list-item]
    return {key: (lists[0], indices) for key, (lists, indices) in grouped.items()}  # type: ignore[misc]


def combine_norms(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of their concatenation (a 0-d tensor).

    Args:
        norms: 1-D per-tensor norms.
        norm_type: the norm's order.

    Raises:
        RuntimeError: from torch, for an invalid ``norm_type``.

    Example::

        >>> import torch
        >>> combine_norms(torch.tensor([3.0, 4.0])).item()
        5.0
    """
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    result: Tensor = torch.linalg.vector_norm(norms, norm_type)
    return result


def total_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The total gradient norm over ``grads``, as :func:`torch.nn.utils.get_total_norm` computes it.

    Args:
        grads: the gradient tensors (dense).
        norm_type: the norm's order.

    Raises:
        RuntimeError: from torch, for sparse tensors.

    Example::

        >>> import torch
        >>> total_norm([torch.tensor([3.0]), torch.tensor([4.0])]).item()
        5.0
    """
    return combine_norms(grad_norms(grads, norm_type), norm_type)


def group_norms(norms: Tensor, index: Tensor, num_groups: int, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor ``norms`` into ``num_groups`` group norms, ``index[i]`` naming the group.

    One scatter on the device, whatever the number of tensors. A group with no tensor reads 0.

    Args:
        norms: 1-D per-tensor norms.
        index: 1-D int64 tensor of the same length, each entry in ``[0, num_groups)``.
        num_groups: the number of groups.
        norm_type: the norm's order.

    Raises:
        RuntimeError: from torch, when an ``index`` entry is outside ``[0, num_groups)``.

    Example::

        >>> import torch
        >>> group_norms(torch.tensor([3.0, 4.0, 2.0]), torch.tensor([0, 0, 1]), 2).tolist()
        [5.0, 2.0]
    """
    out = torch.zeros(num_groups, dtype=norms.dtype, device=norms.device)
    if math.isinf(norm_type):
        return out.scatter_reduce(0, index, norms, reduce="amax", include_self=True)
    powered = norms.pow(norm_type)
    return out.index_add(0, index, powered).pow(1.0 / norm_type)


def global_norms(norms: Tensor, norm_type: float = 2.0, sharded: Tensor | None = None, group: Any = None) -> Tensor:
    """Per-tensor norms over every rank's shard: the norms of the whole (unsharded) tensors.

    Each rank holds a piece of some gradients (FSDP's flat views, ``DTensor`` shards). A whole
    tensor's p-norm is the p-th root of the sum over ranks of each shard's p-th power (the max for
    the inf-norm): one ``all_reduce`` of one small vector, asynchronous on GPUs (no host sync).

    Args:
        norms: this rank's per-tensor norms (1-D).
        norm_type: the norm's order.
        sharded: a bool mask of the tensors that are shards; None means all. Replicated tensors keep
            their local norm.
        group: the process group (default: the world).

    Returns:
        The global per-tensor norms, identical on every rank.
    """
    return reduce_shard_norms(norms, norm_type, [(sharded, group)])


def reduce_shard_norms(
    norms: Tensor, norm_type: float, reductions: Sequence[tuple[Tensor | None, Any]], extra: Tensor | None = None
) -> Tensor:
    """Per-tensor norms of whole tensors whose shards lie over one or more process groups.

    ``reductions`` lists (mask, group): the tensors in ``mask`` (None: all) are sharded over
    ``group``. A tensor sharded over two mesh dimensions (FSDP2 x tensor parallel) appears in two
    reductions; their p-th-power sums compose, so that it ends up summed over the whole product of
    ranks, while a tensor replicated along a dimension is not counted twice. One small
    ``all_reduce`` per distinct group (one for a 1-D mesh).

    ``extra`` (flags) rides along in every reduction, summed (the max for the inf-norm) as it is;
    with it the result is the norms followed by the reduced extras.
    """
    import torch.distributed as dist

    n = norms.numel()
    if not (dist.is_available() and dist.is_initialized()) or n == 0 or not reductions:
        return norms if extra is None else torch.cat([norms, extra.to(norms.dtype)])
    inf = math.isinf(norm_type)
    acc = norms if inf else norms.double().pow(norm_type)
    side = None if extra is None else extra.to(acc.device, acc.dtype)
    touched = torch.zeros_like(norms, dtype=torch.bool)
    for mask, group in reductions:
        mask = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.to(norms.device)
        vals = torch.where(mask, acc, torch.zeros_like(acc))
        if side is not None:
            vals = torch.cat([vals, side])
        dist.all_reduce(vals, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        if side is not None:
            vals, side = vals[:n], vals[n:]
        acc = torch.where(mask, vals, acc)
        touched = touched | mask
    whole = acc if inf else acc.pow(1.0 / norm_type).to(norms.dtype)
    result = torch.where(touched, whole, norms)
    return result if side is None else torch.cat([result, side.to(result.dtype)])


_CONSTANTS: dict[tuple[str, float], Tensor] = {}


def device_constant(value: float, device: torch.device) -> Tensor:
    """A 0-d float32 ``value`` on ``device``, made once: placeholders in the step's stacks cost no
    kernel (and no host-to-device copy) per step. Never written to.

    Example::

        >>> import torch
        >>> device_constant(0.0, torch.device("cpu")) is device_constant(0.0, torch.device("cpu"))
        True
    """
    key = (str(device), value)
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.full((), value, dtype=torch.float32, device=device)
    return constant


def dtensor_type() -> type[Any] | None:
    """``torch.distributed.tensor.DTensor`` once something has imported it, else None.

    A ``DTensor`` cannot exist before its module is imported (FSDP2 and tensor parallelism import
    it), so the guard never imports it itself: a single-process user does not pay for loading it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)
