"""The flat options, turned into components in one place.

:class:`~lightning_gradguard.GuardCore` declares its options once (``rollback=``, ``skip_spikes=``,
``track_updates=``, ``replay=``, ``track_timesteps=``, the spike thresholds, ...), as users and
LightningCLI know them; :func:`build_components` validates the ones that configure a capability and
builds the component of each, and :func:`build_detectors` the built-in detectors. The module that
defines ``GuardCore`` imports no capability: a new one is a component module, built here from its
option, or passed by the user as ``components=[...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_gradguard._validate import check_number
from lightning_gradguard.core.attribution import ReplayAttribution
from lightning_gradguard.core.checkpoints import CheckpointGate, Checkpoints
from lightning_gradguard.core.component import GuardComponent
from lightning_gradguard.core.recovery import Recovery, Rollback
from lightning_gradguard.core.replicas import ReplicaCheck, Replicas
from lightning_gradguard.core.spike import SpikeStatistic
from lightning_gradguard.core.timesteps import TimestepTracking, make_tracker
from lightning_gradguard.core.updates import UpdateTracking
from lightning_gradguard.detectors import Detector, default_detectors
from lightning_gradguard.detectors.spike import NEW_LEVEL
from lightning_gradguard.events import GradEvent

__all__ = ["build_components", "build_detectors", "check_components"]


def build_components(
    *,
    norm_type: float,
    track_timesteps: bool | Sequence[str],
    timestep_history: int,
    spike_zscore: float | None,
    spike_warmup: int,
    skip_spikes: float | None,
    rollback: Rollback | None,
    on_rollback: Callable[[GradEvent], Any] | None,
    track_updates: bool,
    replay: bool,
    checkpoints: Checkpoints | None = None,
    replicas: Replicas | None = None,
    components: Sequence[GuardComponent] | None = (),
) -> list[GuardComponent]:
    """The components of the options, and the user's, in ``order`` (ties: as listed).

    Raises:
        ValueError: an option is out of range, or two components share a name.
        TypeError: an option has the wrong type.
    """
    check_number("skip_spikes", skip_spikes, minimum=0.0, allow_none=True)
    if rollback is not None and not isinstance(rollback, Rollback):
        raise TypeError(
            f"Expected `rollback` to be a Rollback such as Rollback(every=100), or None, but got {rollback!r}."
        )
    if on_rollback is not None and not callable(on_rollback):
        raise TypeError(
            f"Expected `on_rollback` to be a callable taking the rollback event, or None, but got {on_rollback!r}."
        )
    if not isinstance(track_updates, bool):
        raise TypeError(f"Expected `track_updates` to be a bool, but got {track_updates!r}.")
    if not isinstance(replay, bool):
        raise TypeError(f"Expected `replay` to be a bool, but got {replay!r}.")
    if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
        raise TypeError(
            f"Expected `checkpoints` to be a Checkpoints such as Checkpoints(quarantine='rename'), or None, "
            f"but got {checkpoints!r}."
        )
    if replicas is not None and not isinstance(replicas, Replicas):
        raise TypeError(
            f"Expected `replicas` to be a Replicas such as Replicas(action='warn'), or None, but got {replicas!r}."
        )
    if replicas is not None and replicas.action == "rollback" and rollback is None:
        raise ValueError(
            "Expected `rollback` to be a Rollback(...) for Replicas(action='rollback'), but got None: a rollback "
            "needs snapshots (or choose action='repair', 'warn' or 'stop')."
        )
    built: list[GuardComponent] = []
    tracker = make_tracker(track_timesteps, norm_type)
    if tracker is not None:
        built.append(TimestepTracking(tracker, timestep_history))
    confirm = rollback.spike_zscore if rollback is not None else None
    if spike_zscore is not None or skip_spikes is not None or confirm is not None:
        patience = rollback.spike_patience if rollback is not None else 0
        built.append(SpikeStatistic(spike_warmup, event_zscore=spike_zscore, skip_zscore=skip_spikes,
                                    confirm_zscore=confirm, new_level=max(NEW_LEVEL, patience + 1)))  # fmt: skip
    if track_updates:
        built.append(UpdateTracking(norm_type, spike_zscore if spike_zscore is not None else 6.0))
    if replay:
        built.append(ReplayAttribution())
    if rollback is not None:
        recovery = Recovery(rollback)
        recovery.on_rollback = on_rollback
        built.append(recovery)
    if checkpoints is not None:
        built.append(CheckpointGate(checkpoints))
    if replicas is not None:
        built.append(ReplicaCheck(replicas))
    return sorted([*built, *check_components(components, built)], key=lambda c: c.order)


def check_components(given: Sequence[GuardComponent] | None, built: Sequence[GuardComponent]) -> list[GuardComponent]:
    """The user's ``components``, checked: instances of :class:`GuardComponent`, each named, no name twice.

    Raises:
        TypeError: not a list of components.
        ValueError: a component without a name, or two with the same one.
    """
    if given is None:
        return []
    if isinstance(given, GuardComponent) or not isinstance(given, (list, tuple)):
        raise TypeError(f"Expected `components` to be a list of GuardComponent instances, but got {given!r}.")
    names = {c.name for c in built}
    for c in given:
        if not isinstance(c, GuardComponent):
            raise TypeError(f"Expected `components` to hold GuardComponent instances, but got {c!r}.")
        if not isinstance(c.name, str) or not c.name:
            raise ValueError(
                f"Expected each component to have a `name` (its key in the guard's state), but {c!r} has none."
            )
        if c.name in names:
            raise ValueError(f"Expected each component's `name` to be unique, but got {c.name!r} twice.")
        names.add(c.name)
    return list(given)


def build_detectors(
    *,
    explode_threshold: float | None,
    spike_zscore: float | None,
    vanish_threshold: float,
    vanish_ratio: float | None,
    vanish_patience: int,
    min_loss_scale: float,
    timestep_vanish_ratio: float,
) -> list[Detector]:
    """The built-in detectors (:func:`~lightning_gradguard.detectors.default_detectors`)."""
    return default_detectors(
        explode_threshold=explode_threshold,
        spike_zscore=spike_zscore,
        vanish_threshold=vanish_threshold,
        vanish_ratio=vanish_ratio,
        vanish_patience=vanish_patience,
        min_loss_scale=min_loss_scale,
        timestep_vanish_ratio=timestep_vanish_ratio,
    )
