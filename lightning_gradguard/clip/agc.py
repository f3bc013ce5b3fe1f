"""Adaptive gradient clipping (AGC): each unit's gradient is clipped against its own weight.

Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without
Normalization": a unit (a row of a weight matrix) whose ‖G‖/max(‖W‖, eps) exceeds λ is rescaled to λ.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._validate import check_number
from lightning_gradguard.clip.base import (
    ClipContext,
    ClipOutcome,
    Clipper,
    _ones,
    scale_grads_,
)
from lightning_gradguard.primitives.norms import (
    combine_norms,
    grad_norms,
)


def _local(t: Tensor) -> Tensor:
    """A ``DTensor``'s local shard; any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def unitwise_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The L2 norm of each unit of each tensor, as AGC defines units.

    A unit is a slice along the first dimension (a row of a Linear weight, an output channel of a
    convolution); a 0-d or 1-d tensor is a single unit. Each result has the tensor's dimensions, with
    size 1 in every dimension but the first, so it broadcasts against the tensor.

    Args:
        tensors: weights or gradients.

    Raises:
        RuntimeError: from torch, for sparse tensors.

    Example::

        >>> import torch
        >>> [n.flatten().tolist() for n in unitwise_norms([torch.tensor([[3.0, 4.0], [0.0, 1.0]]),
        ...                                                  torch.tensor([3.0, 4.0])])]
        [[5.0, 1.0], [5.0]]
    """
    out = []
    for t in tensors:  # one kernel per tensor: no fused per-row norm exists (see AGC's docstring)
        if t.ndim <= 1:
            out.append(torch.linalg.vector_norm(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t))
        else:
            dims = tuple(range(1, t.ndim))
            src = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
            out.append(torch.linalg.vector_norm(src, dim=dims, keepdim=True))
    return out


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _matches_any(names: Sequence[str], pattern: str) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for name in names)


class AGC(Clipper):
    """Adaptive gradient clipping, unit-wise (Brock, De, Smith and Simonyan, 2021, NFNets).

    For each unit i (a row of a weight's first dimension; a 0-d or 1-d parameter is one unit), with
    ‖W_i‖* = max(‖W_i‖, eps): if ‖G_i‖ / ‖W_i‖* > ``clip_factor``, then
    G_i ← clip_factor · ‖W_i‖* / ‖G_i‖ · G_i. Norms are L2 (Frobenius), as in the paper, whatever the
    guard's ``norm_type``. Logged: ``gradguard/clipped_units``, the number of units clipped, and
    ``gradguard/clip_threshold`` = ``clip_factor``.

    Each unit keeps its direction; the whole gradient's direction changes when some units are
    clipped and others not. The paper leaves the final classifier unclipped: name it in ``exclude``.

    Cost: unlike the other clippers AGC needs a per-row norm of every weight and gradient, for which
    torch has no fused (``_foreach``) kernel: it runs one norm kernel per parameter tensor (a Python
    loop over parameters) and one ``_foreach_mul_``. No host sync. ``benchmarks/`` measures it.

    Args:
        clip_factor: λ, the largest allowed ratio of gradient to weight norm per unit, ``> 0``.
        eps: the floor on weight norms, so that zero-initialised units can move, ``> 0``.
        exclude: layer names, parameter names (``head.weight``) or glob patterns (``head*``) of
            parameters left unclipped.

    Raises:
        ValueError: ``clip_factor`` or ``eps`` is not positive.
        TypeError: ``exclude`` is not a list of strings.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> w.grad = torch.tensor([[0.3, 0.4], [1e-4, 0.0]])   # ratios 0.1 and 0.1 (eps floor)
        >>> ctx = ClipContext.of([w.grad], params=[w])
        >>> out = AGC(clip_factor=0.01).clip_(ctx)
        >>> [[round(v, 6) for v in row] for row in w.grad.tolist()], int(out.clipped_units)
        ([[0.03, 0.04], [1e-05, 0.0]], 2)
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()) -> None:
        self.clip_factor = check_number("clip_factor", clip_factor, minimum=0.0)
        self.eps = check_number("eps", eps, minimum=0.0)
        if (
            isinstance(exclude, (str, bytes))
            or not isinstance(exclude, (list, tuple, set, frozenset))
            or not all(isinstance(e, str) for e in exclude)
        ):
            raise TypeError(f"Expected `exclude` to be a list of layer names or glob patterns, but got {exclude!r}.")
        self.exclude = tuple(exclude)
        self._mask_cache: dict[tuple[str, ...], list[bool]] = {}

    def _kept(self, ctx: ClipContext) -> list[bool]:
        key = tuple(ctx.param_names)
        if key not in self._mask_cache:
            self._mask_cache[key] = [
                not (_matches(ctx.layer_names[layer], self.exclude) or _matches(name, self.exclude))
                for layer, name in zip(ctx.layer_of, ctx.param_names, strict=True)
            ]
        return self._mask_cache[key]

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        assert self.clip_factor is not None and self.eps is not None
        if ctx.sharded and ctx.global_norms is None:
            raise ValueError(
                "Expected whole (unsharded) gradients for AGC, whose units are rows of each weight, but got "
                "sharded gradients (FSDP/DTensor). Use NormClip, LayerNormClip, AutoClip or ZClip there."
            )
        if len(ctx.params) != len(ctx.grads):
            raise ValueError("Expected `params` matching `grads` in the ClipContext for AGC, but got none.")
        kept = self._kept(ctx) if self.exclude else [True] * len(ctx.grads)
        grads = [g for g, k in zip(ctx.grads, kept, strict=True) if k]
        params = [p for p, k in zip(ctx.params, kept, strict=True) if k]
        threshold = torch.full_like(ctx.total, self.clip_factor)
        if not grads:
            return ClipOutcome(
                _ones(ctx.total),
                ctx.total if ctx.want_norm else None,
                threshold,
                clipped=torch.zeros((), dtype=torch.bool, device=ctx.total.device),
                clipped_units=torch.zeros((), dtype=torch.int64, device=ctx.total.device),
            )
        # A DTensor weight's rows are measured on this rank's shard: rows lie whole on one rank
        # (check_placements refuses any other layout), like its gradient's.
        w_norms = unitwise_norms([_local(p.detach()) for p in params])
        g_norms = unitwise_norms(grads)
        if ctx.inv_scale is not None:
            g_norms = list(torch._foreach_mul(g_norms, ctx.inv_scale))
        limits = torch._foreach_mul(torch._foreach_clamp_min(w_norms, self.eps), self.clip_factor)
        coefs = []
        hits = []
        for limit, gn in zip(limits, g_norms, strict=True):
            hit = gn > limit
            coef = torch.where(hit & ctx.finite, limit / gn.clamp(min=1e-6), torch.ones_like(gn))
            coefs.append(coef)
            hits.append((hit & ctx.finite).sum())
        scale_grads_(grads, coefs)
        per_tensor = torch.stack(hits)
        if ctx.global_norms is not None:  # rows of a sharded weight lie on several ranks: count them all
            per_tensor = ctx.global_norms(per_tensor.double(), 1.0).round().to(torch.int64)
        units = per_tensor.sum()
        clipped_total = None
        if ctx.want_norm:
            local = grad_norms(ctx.grads, ctx.norm_type)
            whole = ctx.global_norms(local, ctx.norm_type) if ctx.global_norms is not None else local
            clipped_total = combine_norms(whole, ctx.norm_type)
        if clipped_total is not None and ctx.inv_scale is not None:
            clipped_total = clipped_total * ctx.inv_scale
        coef = _ones(ctx.total)
        if clipped_total is not None:
            clipped_total = torch.where(ctx.finite, clipped_total.to(ctx.total.device), ctx.total)
            coef = torch.where(ctx.total > 0, clipped_total / ctx.total, coef)
        return ClipOutcome(coef, clipped_total, threshold, clipped=units > 0, clipped_units=units)

    def unmatched_names(self, layers: Sequence[str], params: Sequence[str]) -> list[str]:
        """The ``exclude`` entries that match no layer and no parameter name (a typo excludes nothing)."""
        return [p for p in self.exclude if not (_matches_any(layers, p) or _matches_any(params, p))]

    def check_placements(self, names: Sequence[str], layers: Sequence[str], params: Sequence[Tensor]) -> None:
        """Refuse a sharded parameter whose units do not lie whole on one rank.

        AGC's unit is a row (the slice along dimension 0) of a weight, and a whole 0-d or 1-d
        tensor. A ``DTensor`` parameter is fine when every placement is ``Replicate`` or, for a
        weight of 2 or more dimensions, ``Shard(0)`` (FSDP2's layout, ``ColwiseParallel``).
        Excluded parameters are not checked.

        Raises:
            ValueError: naming the first parameter whose placement splits a unit, and the placement.
        """
        for name, layer, p in zip(names, layers, params, strict=True):
            placements = getattr(p, "placements", None)
            if placements is None or _matches(layer, self.exclude) or _matches(name, self.exclude):
                continue
            # rows stay whole when dimension 0 is the one split (Shard(0), FSDP2's _StridedShard(0))
            whole = all(
                pl.is_replicate() or (p.ndim >= 2 and not pl.is_partial() and getattr(pl, "dim", None) == 0)
                for pl in placements
            )
            if not whole:
                raise ValueError(
                    f"AGC cannot clip `{name}`: its placement {tuple(placements)} splits AGC's units (the rows "
                    "of a weight; a whole 1-d or 0-d tensor) across ranks. Exclude it (AGC(exclude=[...])), "
                    "shard it along dimension 0 only, or use NormClip, LayerNormClip, AutoClip or ZClip."
                )

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor!r}, eps={self.eps!r}, exclude={list(self.exclude)!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mask_cache"] = {}
        return state


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
