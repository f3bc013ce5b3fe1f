"""The functional API: every measurement and clip the guard performs, on plain tensors.

Each function lives beside the class that uses it (``clip/zclip.py`` holds :class:`ZClip` and
:func:`zclip_target`, which ZClip calls); this module gathers them, so that what you compute here is
what the callback logs.

Example::

    >>> import torch
    >>> from lightning_gradguard import functional as F
    >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    >>> F.grad_norms(grads).tolist(), F.total_norm(grads).item()
    ([5.0, 12.0], 13.0)
"""

from lightning_gradguard.clip.agc import adaptive_clip_, unitwise_norms
from lightning_gradguard.clip.autoclip import percentile_threshold
from lightning_gradguard.clip.base import clip_grads_by_norm_, clip_grads_by_value_
from lightning_gradguard.clip.norm import clip_layers_by_norm_
from lightning_gradguard.clip.zclip import zclip_target, zclip_update
from lightning_gradguard.detectors.nonfinite import nonfinite_tensors, origin_of
from lightning_gradguard.primitives.norms import combine_norms, grad_norms, group_norms, total_norm

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
    "zclip_update",
]
