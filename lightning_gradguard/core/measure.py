"""Measuring gradients: the first stage of a step, without host syncs.

:func:`measure_step` collects the optimizer's gradients, takes their norms (the math is
:mod:`lightning_gradguard.primitives.norms`: one ``_foreach_norm`` per (device, dtype) group),
makes them global across shards and unscales them under fp16 AMP, all on the device. Everything
after it (clipping, the decision, the detectors) works from its :class:`Measurement`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_gradguard.primitives.norms import (
    combine_norms,
    device_constant,
    dtensor_type,
    grad_norms,
    group_by_device_and_dtype,
    group_norms,
    reduce_shard_norms,
)

if TYPE_CHECKING:
    from lightning_gradguard.primitives.layout import OptimizerLayout


__all__ = ["Measurement", "layer_norms", "layer_norms_now", "measure_step", "weight_norms"]


def _spans_world(reductions: Sequence[tuple[Tensor | None, Any]]) -> bool:
    """Whether the groups compose to the whole world (mesh dimensions whose sizes multiply to it)."""
    import torch.distributed as dist

    groups = {id(g): g for _, g in reductions}
    return math.prod(dist.get_world_size(g) for g in groups.values()) == dist.get_world_size()


@dataclass(slots=True)
class Measurement:
    """What :func:`measure_step` found on the device for one optimizer step (no host value in it).

    Attributes:
        grads: the dense local gradients measured (a ``DTensor``'s local shard).
        owners: the index in ``layout.params`` of each gradient's parameter.
        norms: the per-tensor norms, global across shards and unscaled.
        total: their total norm (0-d).
        finite: ``total`` is finite (0-d bool).
        inv_scale: 1/loss-scale while the gradients are still scaled (a fused optimizer under
            fp16), else None.
        amp_found: the GradScaler's own overflow flag (0-d), or None without a scaler.
        loss_scale: the GradScaler's current scale (0-d), or None.
        sharded: the gradients are shards (norms were all-reduced).
        single_group: every gradient shares one device and dtype.
        zero: a 0-d float32 zero on the gradients' device (:func:`device_constant`).
        reductions: the (mask, process group) pairs the norms were reduced over (empty: not sharded).
        shared_flags: [loss non-finite, fp16 overflow] summed over every rank with the norms'
            all-reduce (their groups span the world), so that the step needs no collective of its
            own for its flags; None otherwise.
        loss_finite: the loss flag the step was given (0-d bool), or None.
    """

    grads: list[Tensor]
    owners: list[int]
    norms: Tensor
    total: Tensor
    finite: Tensor
    inv_scale: Tensor | None
    amp_found: Tensor | None
    loss_scale: Tensor | None
    sharded: bool
    single_group: bool
    zero: Tensor
    reductions: list[tuple[Tensor | None, Any]]
    shared_flags: Tensor | None = None
    loss_finite: Tensor | None = None

    def global_norms(self, values: Tensor, norm_type: float) -> Tensor:
        """Per-tensor values of the local shards made whole, over the same groups as the norms."""
        return reduce_shard_norms(values, norm_type, self.reductions)


def measure_step(
    layout: OptimizerLayout,
    norm_type: float,
    *,
    sharded: bool = False,
    process_group: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    warn: Callable[[str, str], None] | None = None,
    loss_finite: Tensor | None = None,
) -> Measurement | None:
    """Measure the gradients of ``layout``'s parameters on the device; None when there are none.

    Args:
        layout: the optimizer's parameters and layers (:class:`~lightning_gradguard.primitives.layout.LayerMap`).
        norm_type: the order of every norm.
        sharded: every gradient is a shard of a larger tensor (FSDP's flat views); ``DTensor``
            gradients are recognised without it.
        process_group: the ranks holding the shards (default: the world).
        optimizer: the optimizer, to find its GradScaler state.
        scaler: the fp16 GradScaler, if any.
        warn: called as ``warn(key, message)`` for one-time warnings (sparse gradients).
        loss_finite: whether the loss was finite (0-d bool), to be summed over the ranks with the
            sharded norms (:attr:`Measurement.shared_flags`).
    """
    grads, owners, shard_groups = _collect(layout, sharded, warn)
    if not grads:
        return None
    device = grads[0].device
    inv_scale, amp_found = _amp_state(optimizer, scaler, device)
    if layout.single_group is None:  # learned once: gradients keep their device and dtype
        layout.single_group = len(group_by_device_and_dtype(grads)) == 1
    single = bool(layout.single_group)
    norms = grad_norms(grads, norm_type, single)
    zero = device_constant(0.0, device)
    if shard_groups is not None:
        reductions, spans = _reductions(shard_groups, process_group, norms.device, layout.reduction_cache)
    elif sharded:
        reductions = [(None, process_group)]
        spans = _spans_world(reductions)
    else:
        reductions, spans = [], False
    is_sharded = bool(reductions)
    shared: Tensor | None = None
    if is_sharded and spans:  # the step's flags ride in the norms' all-reduce
        one = device_constant(1.0, norms.device)
        loss_bad = zero if loss_finite is None else torch.where(loss_finite.to(norms.device), zero, one)
        amp_bad = zero if amp_found is None else amp_found.to(norms.device).float()
        both = reduce_shard_norms(norms, norm_type, reductions, torch.stack([loss_bad, amp_bad]))
        norms, shared = both[: len(grads)], both[len(grads) :]
    elif is_sharded:
        norms = reduce_shard_norms(norms, norm_type, reductions)
    if inv_scale is not None:
        norms = norms * inv_scale
    total = combine_norms(norms, norm_type)
    # A norm is >= 0 or NaN: "below inf" is "finite" in one kernel (isfinite takes four on some backends).
    finite = total < math.inf
    if inv_scale is not None:  # scaled grads: an overflow is the scaler's business
        amp_found = ~finite
    enabled = scaler is not None and scaler.is_enabled()
    loss_scale = scaler._scale if enabled and scaler._scale is not None else None  # type: ignore[union-attr]
    return Measurement(
        grads, owners, norms, total, finite, inv_scale, amp_found, loss_scale, is_sharded, single, zero, reductions,
        shared, loss_finite,
    )  # fmt: skip


def layer_norms(
    norms: Tensor, owners: Sequence[int], layout: OptimizerLayout, norm_type: float
) -> tuple[list[int], Tensor]:
    """(the layer ids present, their norms on the device): one scatter over the per-tensor ``norms``
    of the parameters at ``owners``."""
    index, layer_ids, layer_sel = layout.index(owners, norms.device)
    per_layer = group_norms(norms, index, len(layout.layer_names), norm_type).index_select(0, layer_sel)
    return layer_ids, per_layer


def weight_norms(norms: Tensor, owners: Sequence[int], layout: OptimizerLayout, norm_type: float) -> Tensor:
    """The norm of the weights of each layer present at ``owners`` (for ``vanish_ratio``), on the device."""
    index, _, layer_sel = layout.index(owners, norms.device)
    weights = [layout.params[i].detach() for i in owners]
    w_norms = grad_norms(weights, norm_type).to(norms.device)
    return group_norms(w_norms, index, len(layout.layer_names), norm_type).index_select(0, layer_sel)


def layer_norms_now(
    norms: Tensor, owners: Sequence[int], layout: OptimizerLayout, norm_type: float
) -> dict[str, float]:
    """Every present layer's norm on the host (one more host read: for rare steps, such as a spike)."""
    layer_ids, per_layer = layer_norms(norms, owners, layout, norm_type)
    return {layout.layer_names[i]: v for i, v in zip(layer_ids, per_layer.tolist(), strict=True)}


def _collect(
    layout: OptimizerLayout, sharded: bool, warn: Callable[[str, str], None] | None
) -> tuple[list[Tensor], list[int], list[tuple[Any, ...]] | None]:
    """The dense local gradients of the layout's parameters, their indices and the process groups
    each one is sharded over.

    Fast path (the usual case, learned on the first step): every gradient is a plain dense
    tensor; one list comprehension, as in ``clip_grad_norm_``, and the groups are None (every
    gradient sharded over the guard's group when ``sharded``, else none). Otherwise each gradient is
    looked at: a ``DTensor`` gradient is measured through its local shard, sharded over the groups
    of its mesh dimensions with a ``Shard`` (or ``Partial``) placement; sparse ones are skipped with
    a one-time warning.
    """
    params = layout.params
    if layout.plain:
        raw = [p.grad for p in params]
        grads = [g for g in raw if g is not None]
        if len(grads) == len(params):
            return grads, layout.all_owners, None
        if sharded:  # FSDP1: keep every rank's norms vector aligned (see _placeholder)
            owners = [i for i, g in enumerate(raw) if g is not None or params[i].requires_grad]
            return [_placeholder(params[i], raw[i]) for i in owners], owners, None
        return grads, [i for i, g in enumerate(raw) if g is not None], None
    grads, owners, groups = [], [], []
    special = False
    dtensor = dtensor_type()
    over: tuple[Any, ...]
    for i, p in enumerate(params):
        g = p.grad
        if g is None and sharded and p.requires_grad:
            g = _placeholder(p, g)
        if g is None:
            continue
        if dtensor is not None and isinstance(g, dtensor):
            special = True
            known = layout.shard_groups.get(i)
            if known is None:  # placements do not change: looked up once per parameter
                # Every placement but Replicate splits the tensor (Shard, _StridedShard, Partial)
                dims = [d for d, pl in enumerate(g.placements) if not pl.is_replicate()]
                known = layout.shard_groups[i] = tuple(g.device_mesh.get_group(mesh_dim=d) for d in dims)
            over = known
            g = g.to_local()
        else:
            over = (None,) if sharded else ()
        if g.is_sparse:
            special = True
            if warn is not None:
                warn("sparse", "GradGuard: sparse gradients are not measured or clipped; they are skipped.")
            continue
        grads.append(g)
        owners.append(i)
        groups.append(over)
    if grads and layout.plain is None:
        layout.plain = not special
    return grads, owners, groups


def _placeholder(p: Tensor, g: Tensor | None) -> Tensor:
    """``g``, or an empty gradient for a parameter that lies wholly outside this rank's shard.

    FSDP1 with ``use_orig_params=True`` leaves such a parameter's ``.grad`` None on that rank only;
    an empty stand-in (norm 0, never written back) keeps the per-tensor norms lined up across ranks
    for their all-reduce, so that no rank waits on a vector of another length.
    """
    return g if g is not None else p.new_zeros(0)


def _reductions(
    groups: Sequence[tuple[Any, ...]], default: Any, device: torch.device, cache: dict[Any, Any]
) -> tuple[list[tuple[Tensor | None, Any]], bool]:
    """(mask, group) per distinct group the gradients are sharded over (``None`` stands for
    ``default``), and whether those groups span the world; cached: the masks cost a host-to-device
    copy only the first time."""
    key = (tuple(tuple(id(g) for g in over) for over in groups), str(device))
    found = cache.get(key)
    if found is None:
        distinct: dict[int, Any] = {}
        for over in groups:
            for g in over:
                distinct.setdefault(id(g), g)
        reductions: list[tuple[Tensor | None, Any]] = []
        for gid, group in distinct.items():
            members = [any(id(g) == gid for g in over) for over in groups]
            mask = None if all(members) else torch.tensor(members, device=device)
            reductions.append((mask, default if group is None else group))
        if len(cache) > 8:
            cache.clear()
        found = cache[key] = (reductions, bool(reductions) and _spans_world(reductions))
    return found  # type: ignore[no-any-return]


def _amp_state(
    optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """(1/scale if the gradients are still scaled, the scaler's found-inf flag if it unscaled)."""
    if scaler is None or not scaler.is_enabled() or optimizer is None:
        return None, None
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        found = state["found_inf_per_device"]
        flag = sum((v.to(device).reshape(()) for v in found.values()), torch.zeros((), device=device))
        return None, flag
    scale = scaler._scale
    assert scale is not None
    return scale.double().reciprocal().float().to(device), None
