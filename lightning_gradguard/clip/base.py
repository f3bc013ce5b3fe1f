"""What every clipper shares: the :class:`Clipper` interface, its :class:`ClipContext` and
:class:`ClipOutcome`, and the in-place primitives (:func:`scale_grads_`, :func:`clip_grads_by_norm_`,
:func:`clip_grads_by_value_`).

A clipper never turns non-finite gradients into finite garbage: it uses a coefficient of exactly 1
when the total norm is not finite (decided with ``torch.where`` on the device), or it is *deferred*
(applied only once the guard knows the step is finite). What happens to a non-finite step is the
guard's ``on_nonfinite`` policy's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.primitives.norms import (
    combine_norms,
    device_constant,
    grad_norms,
    group_by_device_and_dtype,
    total_norm,
)

__all__ = [
    "ClipContext",
    "ClipOutcome",
    "Clipper",
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "scale_grads_",
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
        >>> from lightning_gradguard import NormClip
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

    def unmatched_names(self, layers: Sequence[str], params: Sequence[str]) -> list[str]:
        """The names or patterns this clipper was given that match none of the model's ``layers`` and
        ``params``: the guard warns about each, with the closest name. None by default."""
        return []

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
