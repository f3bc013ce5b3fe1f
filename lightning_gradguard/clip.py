"""Clipping gradients before the optimizer step, on the device, without host syncs.

* :class:`NormClip` rescales all gradients together so that their total norm is at most
  ``max_norm``: g ← g · min(1, max_norm / (‖g‖ + 1e-6)). This is exactly
  :func:`torch.nn.utils.clip_grad_norm_`. It keeps the gradient's direction and only changes its
  length (Pascanu, Mikolov and Bengio, 2013, "On the difficulty of training recurrent neural
  networks").
* :class:`ValueClip` clamps every element into ``[-max_value, max_value]``, exactly
  :func:`torch.nn.utils.clip_grad_value_`. It changes the gradient's direction whenever it bites.

A clipper never turns non-finite gradients into finite garbage: :class:`NormClip` uses a coefficient
of exactly 1 when the total norm is not finite (decided with ``torch.where`` on the device), and
:class:`ValueClip` is *deferred*: the guard applies it only after it has established that the step
is finite. What happens to a non-finite step is the guard's ``on_nonfinite`` policy's business.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._validate import check_number
from lightning_gradguard.measure import (
    combine_norms,
    device_constant,
    grad_norms,
    group_by_device_and_dtype,
    total_norm,
)

__all__ = [
    "AGC",
    "ClipContext",
    "ClipOutcome",
    "Clipper",
    "LayerNormClip",
    "NormClip",
    "ValueClip",
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "unitwise_norms",
]

_EPS = 1e-6


@dataclass
class ClipOutcome:
    """What a clipper did on one step (all device tensors, no host sync).

    Attributes:
        coef: the factor by which the total norm changed (1.0 means no change).
        clipped_total: the total norm after clipping, or None if it was not computed.
        threshold: the threshold in force, or None.
        clipped: a 0-d bool tensor, True when the clipper changed the gradients this step; None
            means ``coef < 1``.
        clipped_units: for unit-wise clippers, how many units (layers, rows) were clipped.

    Example::

        >>> import torch
        >>> out = NormClip(1.0).clip_(ClipContext.of([torch.tensor([3.0, 4.0])], want_norm=True))
        >>> round(out.coef.item(), 4), bool(out.clipped), round(out.clipped_total.item(), 4)
        (0.2, True, 1.0)
    """

    coef: Tensor
    clipped_total: Tensor | None = None
    threshold: Tensor | None = None
    clipped: Tensor | None = None
    clipped_units: Tensor | None = None


@dataclass
class ClipContext:
    """Everything a clipper may use on one step. Built by the guard; no host sync to build.

    Attributes:
        grads: the gradients of one optimizer step (dense; possibly still scaled by a GradScaler).
        norms: their per-tensor norms under ``norm_type``, unscaled and global across shards.
        total: their total norm under ``norm_type`` (0-d).
        finite: a 0-d bool tensor, True when the step is finite.
        norm_type: the guard's norm type.
        want_norm: whether the caller wants the clipped total norm (logging steps).
        params: the parameters owning ``grads``, in the same order (for AGC).
        layer_of: the layer id of each gradient (ints, same order).
        layer_names: every layer name of the optimizer, indexed by layer id.
        param_names: each gradient's parameter name (``layer.weight``), same order.
        inv_scale: 1/loss-scale when ``grads`` are still scaled, else None.
        single_group: every gradient has the same device and dtype (lets kernels skip grouping).
        host_observed: the guard will call the clipper's ``observe(total, finite)`` with this step's
            host values after its sync (clippers with ``needs_host_stats``); False when a clipper is
            used on its own.
        sharded: the gradients are shards (FSDP, DTensor); unit-wise rules that need whole tensors
            refuse them.
        global_norms: for sharded gradients, ``global_norms(values, p)`` turns per-tensor p-norms
            of the local shards into the whole tensors' (one all-reduce; p=1 sums counts); None
            otherwise.
        want_bit: whether the caller needs :attr:`ClipOutcome.clipped`; a clipper whose "clipped"
            is just ``coef < 1`` may leave it None when False (the guard reads ``coef`` instead:
            one kernel less per step).

    Example::

        >>> import torch
        >>> ctx = ClipContext.of([torch.tensor([3.0]), torch.tensor([4.0])])
        >>> ctx.norms.tolist(), ctx.total.item(), ctx.layer_index().tolist()
        ([3.0, 4.0], 5.0, [0, 1])
    """

    grads: Sequence[Tensor]
    norms: Tensor
    total: Tensor
    finite: Tensor
    norm_type: float = 2.0
    want_norm: bool = False
    params: Sequence[Tensor] = ()
    layer_of: Sequence[int] = ()
    layer_names: Sequence[str] = ()
    param_names: Sequence[str] = ()
    inv_scale: Tensor | None = None
    sharded: bool = False
    single_group: bool = False
    host_observed: bool = False
    want_bit: bool = True
    global_norms: Callable[[Tensor, float], Tensor] | None = None
    _index: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, grads: Sequence[Tensor], norm_type: float = 2.0, **kwargs: Any) -> ClipContext:
        """A context for plain ``grads`` (each its own layer), computing the norms.

        Example::

            >>> import torch
            >>> ctx = ClipContext.of([torch.tensor([3.0, 4.0])])
            >>> ctx.total.item(), bool(ctx.finite)
            (5.0, True)
        """
        norms = grad_norms(grads, norm_type)
        total = combine_norms(norms, norm_type)
        defaults: dict[str, Any] = {
            "layer_of": list(range(len(grads))),
            "layer_names": [f"t{i}" for i in range(len(grads))],
            "param_names": [f"t{i}" for i in range(len(grads))],
        }
        defaults.update(kwargs)
        return cls(grads, norms, total, torch.isfinite(total), norm_type, **defaults)

    def layer_index(self) -> Tensor:
        """The layer id of each gradient as an int64 tensor on the norms' device (built once)."""
        if "layer" not in self._index:
            self._index["layer"] = torch.tensor(list(self.layer_of), dtype=torch.int64, device=self.norms.device)
        return self._index["layer"]


def _own_total(ctx: ClipContext, norm_type: float) -> Tensor:
    """The total norm of ``ctx.grads`` under another norm type than the guard's (unscaled)."""
    if ctx.sharded:
        raise ValueError(
            f"Expected the clipper's `norm_type` to equal the guard's ({ctx.norm_type:g}) on sharded gradients, "
            f"but got {norm_type:g}."
        )
    own = total_norm(ctx.grads, norm_type).to(ctx.total.device)
    return own * ctx.inv_scale if ctx.inv_scale is not None else own


def _ones(like: Tensor) -> Tensor:
    return torch.ones((), dtype=like.dtype, device=like.device)


def scale_grads_(grads: Sequence[Tensor], coefs: Tensor | Sequence[Tensor], single_group: bool = False) -> None:
    """Multiply ``grads`` in place by one 0-d coefficient, or by one coefficient per tensor.

    One ``_foreach_mul_`` per (device, dtype) group; no host sync. ``single_group``: the caller knows
    that all of ``grads`` share one device and dtype.
    """
    if not len(grads):
        return
    if single_group and isinstance(coefs, Tensor):
        torch._foreach_mul_(list(grads), coefs.to(grads[0].device))
        return
    for (device, _dtype), (group, index) in group_by_device_and_dtype(grads).items():
        if isinstance(coefs, Tensor):
            torch._foreach_mul_(group, coefs.to(device))
        else:
            torch._foreach_mul_(group, [coefs[i].to(device, _dtype) for i in index])


def clip_grads_by_norm_(
    grads: Sequence[Tensor], max_norm: float, total: Tensor, finite: Tensor | None = None, single_group: bool = False
) -> Tensor:
    """Scale ``grads`` in place so that their total norm ``total`` becomes at most ``max_norm``.

    Returns the coefficient applied, ``min(1, max_norm / (total + 1e-6))``, or exactly 1 where
    ``finite`` is False. Matches :func:`torch.nn.utils.clip_grad_norm_`.

    Args:
        grads: the gradients, scaled in place.
        max_norm: the largest total norm allowed.
        total: their total norm (0-d tensor).
        finite: a 0-d bool tensor; where False the coefficient is 1 (nothing changes).
        single_group: the caller knows all gradients share one device and dtype.

    Raises:
        RuntimeError: from torch, if ``grads`` mix sparse and dense tensors.

    Example::

        >>> import torch
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> coef = clip_grads_by_norm_(g, 1.0, torch.tensor(5.0))
        >>> [round(v, 4) for v in g[0].tolist()], round(coef.item(), 4)
        ([0.6, 0.8], 0.2)
    """
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    if finite is not None:
        coef = torch.where(finite, coef, device_constant(1.0, coef.device))
    scale_grads_(grads, coef, single_group)
    return coef


def clip_grads_by_value_(grads: Sequence[Tensor], max_value: float) -> None:
    """Clamp every element of ``grads`` into ``[-max_value, max_value]`` in place.

    Matches :func:`torch.nn.utils.clip_grad_value_`.

    Args:
        grads: the gradients, clamped in place.
        max_value: the largest absolute value allowed.

    Raises:
        RuntimeError: from torch, if ``grads`` mix sparse and dense tensors.

    Example::

        >>> import torch
        >>> g = [torch.tensor([-3.0, 0.5, 2.0])]
        >>> clip_grads_by_value_(g, 1.0)
        >>> g[0].tolist()
        [-1.0, 0.5, 1.0]
    """
    if len(grads):
        torch._foreach_clamp_min_(list(grads), -max_value)
        torch._foreach_clamp_max_(list(grads), max_value)


class Clipper:
    """Base class of the clippers that ``GradGuard(clip=...)`` accepts.

    Subclasses implement :meth:`clip_`. A clipper whose ``deferred`` attribute is True is applied only
    on finite steps, after the guard's single host sync; others must be safe on non-finite input.
    Stateful clippers also implement :meth:`state_dict` and :meth:`load_state_dict` (the guard saves
    them in checkpoints).

    Example: a clipper that halves every gradient, no matter what::

        >>> import torch
        >>> class Halve(Clipper):
        ...     def clip_(self, ctx):
        ...         coef = torch.full_like(ctx.total, 0.5)
        ...         coef = torch.where(ctx.finite, coef, torch.ones_like(coef))  # never touch NaN steps
        ...         scale_grads_(ctx.grads, coef)
        ...         return ClipOutcome(coef, ctx.total * coef if ctx.want_norm else None)
        >>> g = [torch.tensor([2.0])]
        >>> _ = Halve().clip_(ClipContext.of(g)); g[0].item()
        1.0
    """

    deferred: bool = False
    needs_host_stats: bool = False  # True: the guard calls observe() after its sync, every step

    def check_placements(self, names: Sequence[str], layers: Sequence[str], params: Sequence[Tensor]) -> None:
        """Refuse parameter layouts (``DTensor`` placements) this clipper cannot clip correctly; the
        guard calls it once per optimizer, before the first step. By default every layout is fine.

        Raises:
            ValueError: a parameter's placement is not supported (the message names both).
        """

    def observe(self, total: float, finite: bool) -> None:
        """This step's pre-clip total norm on the host, after the guard's sync (``needs_host_stats``)."""

    def clip_(self, ctx: ClipContext) -> ClipOutcome:
        """Clip ``ctx.grads`` in place, without a host sync, and say what was done.

        Must leave non-finite gradients exactly as they are (``ctx.finite`` is False): never turn
        them into finite values, and never let them into the clipper's state.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The clipper's state, for checkpoints (stateless clippers return ``{}``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


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
        from lightning_gradguard.measure import group_norms

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
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, (list, tuple, set, frozenset)) or not all(
            isinstance(e, str) for e in exclude
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
            return ClipOutcome(_ones(ctx.total), ctx.total if ctx.want_norm else None, threshold,
                               clipped=torch.zeros((), dtype=torch.bool, device=ctx.total.device),
                               clipped_units=torch.zeros((), dtype=torch.int64, device=ctx.total.device))
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
