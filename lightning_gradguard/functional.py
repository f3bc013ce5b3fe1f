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

from lightning_gradguard.clip import clip_grads_by_norm_, clip_grads_by_value_
from lightning_gradguard.detect import nonfinite_tensors, origin_of
from lightning_gradguard.measure import combine_norms, grad_norms, group_norms, total_norm

__all__ = [
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "combine_norms",
    "grad_norms",
    "group_norms",
    "nonfinite_tensors",
    "origin_of",
    "total_norm",
]
