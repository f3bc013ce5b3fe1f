"""Detectors: each takes a settled step's host values and returns events (see :mod:`.base`).

==========================  ====================================================  =============
module                      events                                                when
==========================  ====================================================  =============
:mod:`.exploding`           ``exploding``                                         finite steps
:mod:`.spike`               ``spike``                                             finite steps
:mod:`.loss_scale`          ``loss_scale_collapse``                               every step
:mod:`.in_time`             ``vanishing_in_time``, ``exploding_in_time``          logging steps
:mod:`.layer_health`        ``vanishing``, ``dead``, ``unused``                   logging steps
==========================  ====================================================  =============

``nonfinite`` and ``amp_overflow`` are not detections but decisions: :mod:`lightning_gradguard.core.decide`
makes them; :mod:`.nonfinite` holds the rule that names where a non-finite step began.
"""

from __future__ import annotations

from lightning_gradguard.detectors.base import Detector, Observation, state_of
from lightning_gradguard.detectors.exploding import ExplodingDetector
from lightning_gradguard.detectors.in_time import InTimeDetector
from lightning_gradguard.detectors.layer_health import LayerHealthDetector
from lightning_gradguard.detectors.loss_scale import LossScaleDetector
from lightning_gradguard.detectors.spike import SpikeDetector

__all__ = [
    "Detector",
    "ExplodingDetector",
    "InTimeDetector",
    "LayerHealthDetector",
    "LossScaleDetector",
    "Observation",
    "SpikeDetector",
    "default_detectors",
    "state_of",
]


def default_detectors(
    *,
    explode_threshold: float | None,
    spike_zscore: float | None,
    vanish_threshold: float,
    vanish_ratio: float | None,
    vanish_patience: int,
    min_loss_scale: float,
    timestep_vanish_ratio: float,
) -> list[Detector]:
    """The built-in detectors, in the order their events are recorded within a step. Each owns its state."""
    detectors: list[Detector] = [] if explode_threshold is None else [ExplodingDetector(explode_threshold)]
    if spike_zscore is not None:
        detectors.append(SpikeDetector(spike_zscore))  # scores the guard's spike statistic (core/spike.py)
    detectors += [
        LossScaleDetector(min_loss_scale),
        InTimeDetector(timestep_vanish_ratio),
        LayerHealthDetector(vanish_threshold, vanish_ratio, vanish_patience),
    ]
    return detectors
