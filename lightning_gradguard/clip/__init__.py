"""The clippers, one module each, behind one interface (:class:`~lightning_gradguard.clip.base.Clipper`).

==========================  ==========================================================  ============
module                      clipper                                                     its rule
==========================  ==========================================================  ============
:mod:`.norm`                :class:`NormClip` (total norm), :class:`LayerNormClip`      ``clip_grads_by_norm_``,
                            (each layer)                                                ``clip_layers_by_norm_``
:mod:`.value`               :class:`ValueClip` (each element)                           ``clip_grads_by_value_``
:mod:`.agc`                 :class:`AGC` (each unit against its weight)                 ``adaptive_clip_``
:mod:`.autoclip`            :class:`AutoClip` (a percentile of the run's norms)         ``percentile_threshold``
:mod:`.zclip`               :class:`ZClip` (z-score of the norm's EMA)                  ``zclip_target``
==========================  ==========================================================  ============

When each one runs within a step (before or after the host read) is the guard's clip stage
(:mod:`lightning_gradguard.core.clipping`). A new clipper is a :class:`Clipper` subclass in a module
of its own here.
"""

from lightning_gradguard.clip.agc import AGC, unitwise_norms
from lightning_gradguard.clip.autoclip import AutoClip
from lightning_gradguard.clip.base import (
    ClipContext,
    ClipOutcome,
    Clipper,
    clip_grads_by_norm_,
    clip_grads_by_value_,
    scale_grads_,
)
from lightning_gradguard.clip.norm import LayerNormClip, NormClip
from lightning_gradguard.clip.value import ValueClip
from lightning_gradguard.clip.zclip import ZClip

__all__ = [
    "AGC",
    "AutoClip",
    "ClipContext",
    "ClipOutcome",
    "Clipper",
    "LayerNormClip",
    "NormClip",
    "ValueClip",
    "ZClip",
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "scale_grads_",
    "unitwise_norms",
]
