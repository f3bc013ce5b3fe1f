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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._validate import check_number
from lightning_gradguard.measure import group_by_device_and_dtype, total_norm

__all__ = ["ClipOutcome", "Clipper", "NormClip", "ValueClip", "clip_grads_by_norm_", "clip_grads_by_value_"]

_EPS = 1e-6


@dataclass
class ClipOutcome:
    """What a clipper did on one step (all device tensors, no host sync).

    Attributes:
        coef: the factor by which the total norm changed (1.0 means no change).
        clipped_total: the total norm after clipping, or None if it was not computed.
        threshold: the threshold in force, or None.
    """

    coef: Tensor
    clipped_total: Tensor | None = None
    threshold: Tensor | None = None


def clip_grads_by_norm_(
    grads: Sequence[Tensor], max_norm: float, total: Tensor, finite: Tensor | None = None
) -> Tensor:
    """Scale ``grads`` in place so that their total norm ``total`` becomes at most ``max_norm``.

    Returns the coefficient applied, ``min(1, max_norm / (total + 1e-6))``, or exactly 1 where
    ``finite`` is False. Matches :func:`torch.nn.utils.clip_grad_norm_`.

    Example::

        >>> import torch
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> coef = clip_grads_by_norm_(g, 1.0, torch.tensor(5.0))
        >>> [round(v, 4) for v in g[0].tolist()], round(coef.item(), 4)
        ([0.6, 0.8], 0.2)
    """
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    if finite is not None:
        coef = torch.where(finite, coef, torch.ones_like(coef))
    if len(grads):
        for (device, _dtype), (group, _index) in group_by_device_and_dtype(grads).items():
            torch._foreach_mul_(group, coef.to(device))
    return coef


def clip_grads_by_value_(grads: Sequence[Tensor], max_value: float) -> None:
    """Clamp every element of ``grads`` into ``[-max_value, max_value]`` in place.

    Matches :func:`torch.nn.utils.clip_grad_value_`.

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
    """

    deferred: bool = False

    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: Tensor,
        total: Tensor,
        finite: Tensor,
        norm_type: float,
        want_norm: bool,
    ) -> ClipOutcome:
        """Clip ``grads`` in place.

        Args:
            grads: the gradients of one optimizer step.
            norms: their per-tensor norms under ``norm_type`` (already unscaled).
            total: their total norm under ``norm_type``.
            finite: a 0-d bool tensor, True when the step is finite.
            norm_type: the guard's norm type.
            want_norm: whether the caller wants the clipped total norm (logging steps).
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
        >>> out = clip.clip_([w.grad], torch.tensor([4.0]), torch.tensor(4.0),
        ...                  torch.tensor(True), 2.0, want_norm=True)
        >>> round(out.clipped_total.item(), 4)
        1.0
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_number("max_norm", max_norm, minimum=0.0)
        self.norm_type = check_number("norm_type", norm_type, minimum=0.0, allow_inf=True)

    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: Tensor,
        total: Tensor,
        finite: Tensor,
        norm_type: float,
        want_norm: bool,
    ) -> ClipOutcome:
        assert self.max_norm is not None and self.norm_type is not None
        own_total = total if self.norm_type == norm_type else total_norm(grads, self.norm_type)
        coef = clip_grads_by_norm_(grads, self.max_norm, own_total, finite)
        clipped = total * coef if want_norm else None
        return ClipOutcome(coef, clipped, torch.full_like(total, self.max_norm))


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
        >>> out = ValueClip(1.0).clip_(g, torch.tensor([3.0]), torch.tensor(3.0),
        ...                            torch.tensor(True), 2.0, want_norm=False)
        >>> g[0].tolist()
        [1.0, -0.5]
    """

    deferred = True

    def __init__(self, max_value: float) -> None:
        self.max_value = check_number("max_value", max_value, minimum=0.0)

    def clip_(
        self,
        grads: Sequence[Tensor],
        norms: Tensor,
        total: Tensor,
        finite: Tensor,
        norm_type: float,
        want_norm: bool,
    ) -> ClipOutcome:
        assert self.max_value is not None
        clip_grads_by_value_(grads, self.max_value)
        if not want_norm:
            return ClipOutcome(torch.ones_like(total), None, torch.full_like(total, self.max_value))
        clipped = total_norm(grads, norm_type).to(total.device)
        coef = torch.where(total > 0, clipped / total, torch.ones_like(total))
        return ClipOutcome(coef, clipped, torch.full_like(total, self.max_value))
