"""The framework-free guard: one optimizer step as a short pipeline.

:class:`GuardCore` imports torch only. The Lightning callback
(:class:`lightning_gradguard.GradGuard`) is a thin adapter over it, and a plain PyTorch loop uses it
directly::

    guard = GuardCore(model, clip=NormClip(max_norm=1.0))
    for batch in loader:
        optimizer.zero_grad()
        loss = model(batch)
        guard.observe_loss(loss)          # optional: lets a NaN loss be named as the origin
        loss.backward()
        report = guard.step(optimizer)    # measure, clip, read, decide, detect, report
        if not report.skipped:
            optimizer.step()

Under fp16 AMP call ``scaler.unscale_(optimizer)`` first, then ``guard.step(optimizer,
scaler=scaler)``, then ``scaler.step(optimizer)``.

One step, as data (``ARCHITECTURE.md`` has the diagram)::

    measure (measure.py) -> clip (clipping.py) -> read (hostread.py) -> decide (decide.py)
        -> detect (../detectors/) -> report (step_report.py)

Every stage but the read works on the device; the read is the step's one host sync, and each stage
gets its host values back by name. :class:`GuardCore` holds the configuration and the state, and
:meth:`GuardCore.step` only passes data from one stage to the next.

Cost: every step, one ``_foreach_norm`` per (device, dtype) group, a few device reductions, the
clip, and exactly one host sync (reading the non-finite flags, which the skip decision needs).
On logging steps the per-layer norms are one extra scatter on the device and ride along in that same
sync. Only a faulty step pays more (to list its non-finite layers).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard._validate import check_choice, check_handlers, check_int, check_number, check_ratio
from lightning_gradguard.clip import Clipper
from lightning_gradguard.core import alerts
from lightning_gradguard.core.attribution import attribute, describe, keep_attributes, replaying_from
from lightning_gradguard.core.clipping import CLIP_LEVEL, ClipStage
from lightning_gradguard.core.decide import (
    FLAGS,
    POLICIES,
    DeviceSkip,
    Fault,
    OnNonFinite,
    StepPolicy,
    Verdict,
    device_flags,
)
from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.core.measure import Measurement, layer_norms, layer_norms_now, measure_step, weight_norms
from lightning_gradguard.core.recovery import Recovery, Rollback, rank
from lightning_gradguard.core.snapshot import RestoreError
from lightning_gradguard.core.spike_skip import DeviceSpikeStats
from lightning_gradguard.core.step_report import (
    METRIC_PREFIX,
    StepReport,
    layer_metrics,
    summarize_run,
    timestep_metrics,
)
from lightning_gradguard.core.timesteps import TimestepHistory, combine_profiles, make_tracker
from lightning_gradguard.core.updates import UPDATE_KEYS, UpdateTracker
from lightning_gradguard.detectors import Detector, Observation, default_detectors, state_of
from lightning_gradguard.detectors.spike import LogNormStats, SpikeDetector
from lightning_gradguard.detectors.updates import UpdateDetector
from lightning_gradguard.dump import capture_rng
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.layout import LayerMap, OptimizerLayout
from lightning_gradguard.primitives.norms import dtensor_type
from lightning_gradguard.primitives.text import unmatched

__all__ = ["METRIC_PREFIX", "GuardCore", "OnNonFinite", "RestoreError", "Rollback", "StepReport"]

GroupBy = Literal["layer", "parameter"]
_WATCH = ("total", "loss_scale", CLIP_LEVEL, "spike_z")  # read with the flags on every step
_PENDING_LIMIT = 256  # deferred steps kept before a read is forced (a run that never logs)


@dataclass(slots=True)
class _Step:
    """One step between its device work and its settling: what its host read and its events need.

    It holds no gradient, so that steps deferred under ``on_nonfinite="warn"`` keep no memory alive.
    """

    number: int
    optimizer_idx: int
    layout: OptimizerLayout
    norms: Tensor
    owners: list[int]
    total: Tensor
    logged: bool
    read: HostRead
    deferred: bool = False  # read later (warn, or skipped on the device): its gradients are gone by then
    layer_ids: Sequence[int] = ()  # logging steps: the layers present
    update_ids: Sequence[int] = ()  # logging steps with track_updates: the layers measured
    replay: tuple[Any, Any, Any, Any] | None = None  # (closure, precision, rng, attributes) of a replayable step
    local_bad: Tensor | None = None  # under data parallelism: this rank's own flags, before the sum
    profiles: Sequence[str] = ()  # logging steps: the tracked sequences read


class GuardCore:
    """Guards the gradients of any optimizer, in any training loop.

    Args:
        model: the model whose parameters are named by layer. Without one, parameters are named
            ``unregistered.g<group>.p<index>``. Can be set later with :meth:`watch`.
        clip: a :class:`~lightning_gradguard.clip.Clipper` applied before the optimizer step, or None.
        norm_type: the order of every reported norm, ``> 0``; ``float('inf')`` for the max-norm.
        on_nonfinite: ``"skip"`` (drop the step: every gradient of the optimizer set to None),
            ``"warn"`` (report only), ``"raise"`` (raise :class:`NonFiniteGradientError`) or ``"stop"``
            (skip, and ask the loop to stop through ``report.should_stop``).
        max_consecutive_skips: the skipped step that makes this many in a row raises
            :class:`NonFiniteGradientError`, so that training never skips forever in silence.
        group_by: ``"layer"`` or ``"parameter"``: the unit of the per-layer norms.
        log_every_n_steps: steps ``s`` with ``(s + 1) % n == 0`` are logging steps; None: never
            (unless :meth:`step` is told ``log=True``).
        max_events: how many events :attr:`events` keeps (the newest).
        emit: called with each event instead of the built-in :class:`~lightning_gradguard.core.alerts.AlertRouter`.
        track_timesteps: per-timestep tracking of recurrent modules: True (all), False, or a list
            of module names.
        timestep_vanish_ratio: ``first_last_ratio`` below it is a ``vanishing_in_time`` event,
            above its reciprocal ``exploding_in_time``; in (0, 1).
        timestep_history: how many logging steps the timestep heatmap keeps.
        sharded: every gradient is a shard of a larger tensor (FSDP's flat views): per-tensor norms
            are all-reduced across ``process_group`` so that every norm, clip and decision is global
            and identical on all ranks. ``DTensor`` gradients are recognised without it.
        process_group: the group of ranks holding the shards (default: the world).
        explode_threshold: an ``exploding`` event when the total norm before clipping exceeds it;
            None (default) is off.
        spike_zscore: a ``spike`` event when the one-sided z-score of log(total norm) against an EMA
            of its recent values exceeds it (default 6.0); None is off.
        spike_warmup: finite steps that only feed the spike statistics (default 50), an int >= 0.
        vanish_threshold: a layer norm below it (default 1e-8) counts as vanishing, ``>= 0``.
        vanish_ratio: a layer whose ‖g‖/‖w‖ is below it counts as vanishing; None (default) is off
            (it costs one weight-norm pass on logging steps).
        vanish_patience: consecutive logging steps below a vanishing threshold before a
            ``vanishing`` event (default 3), an int >= 1.
        min_loss_scale: a ``loss_scale_collapse`` event when the fp16 loss scale falls below it
            (default 1.0).
        alert_every: the same kind of event on the same layers is logged at most once per this many
            optimizer steps (default 100), with a count of the suppressed ones.
        alert_handlers: callables called as ``handler(event)`` with every event, on rank zero; one
            that raises is logged once and never stops training. Notifiers (objects with
            ``on_alert(event, message, run)``, such as :class:`~lightning_gradguard.WebhookAlert`) get
            the rate-limited alarms instead; :meth:`close` lets them finish sending.
        skip_spikes: skip a finite step whose total norm (or observed loss) is above its rolling
            statistics by this z-score, exactly like a non-finite step (on the device, with
            ``found_inf``, for fused optimizers: no extra host read); a ``spike_skipped`` event. The
            statistics (an EMA of log(total norm) and of the loss, warmed up for ``spike_warmup``
            steps) leave out skipped steps. None (default): off.
        rollback: a :class:`~lightning_gradguard.Rollback`: keep recent snapshots and roll back to
            one when a fault persists (see its options). None (default): off.
        on_rollback: called as ``on_rollback(event)`` after each rollback, on every rank: reset the
            state the guard cannot see (a carried hidden state, an EMA of the weights).
        replay: replay the first non-finite step (and the first skipped spike) to tell a transient
            fault from a precision or a data fault, and find where the forward pass broke (see
            :mod:`~lightning_gradguard.core.attribution`); the verdict goes into the event's
            ``extra["replay"]`` and message. Needs the step's closure (``step(..., replay_closure=)``;
            ``GradGuard`` makes it) and :meth:`begin_step` before the forward pass (the RNG state).
            Default True.
        track_updates: on logging steps, also measure each layer's weight norm, the update-to-weight
            ratio ‖ΔW‖/‖W‖ of the update that led into the step, and (Adam-family optimizers) the
            smallest and median √v; ``update_spike`` and ``moment_collapse`` events. Costs one copy of
            the parameters on the step before each logging step. Default False. Not yet for sharded
            parameters (refused at :meth:`prepare`).

    Raises:
        ValueError: an argument is out of range; the message names it.
        TypeError: an argument has the wrong type.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard import NormClip
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = GuardCore(model, clip=NormClip(max_norm=0.5), log_every_n_steps=1)
        >>> loss = model(torch.randn(16, 4)).pow(2).mean()
        >>> loss.backward()
        >>> report = guard.step(opt)
        >>> report.skipped, sorted(report.layer_norms)
        (False, ['0', '2'])
        >>> report.metrics["gradguard/total_norm_clipped"] <= 0.5 + 1e-6
        True
    """


    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        clip: Clipper | None = None,
        norm_type: float = 2.0,
        on_nonfinite: OnNonFinite = "skip",
        max_consecutive_skips: int = 25,
        group_by: GroupBy = "layer",
        log_every_n_steps: int | None = 50,
        max_events: int = 1000,
        emit: Callable[[GradEvent], None] | None = None,
        track_timesteps: bool | Sequence[str] = True,
        timestep_vanish_ratio: float = 1e-4,
        timestep_history: int = 64,
        sharded: bool = False,
        process_group: Any = None,
        explode_threshold: float | None = None,
        spike_zscore: float | None = 6.0,
        spike_warmup: int = 50,
        vanish_threshold: float = 1e-8,
        vanish_ratio: float | None = None,
        vanish_patience: int = 3,
        min_loss_scale: float = 1.0,
        alert_every: int = 100,
        alert_handlers: Sequence[Callable[[GradEvent], Any]] | None = (),
        skip_spikes: float | None = None,
        rollback: Rollback | None = None,
        on_rollback: Callable[[GradEvent], Any] | None = None,
        track_updates: bool = False,
        replay: bool = True,
    ) -> None:
        if clip is not None and not isinstance(clip, Clipper):
            raise TypeError(
                f"Expected `clip` to be a Clipper such as NormClip(max_norm=1.0), or None, but got {clip!r}."
            )
        if not isinstance(sharded, bool):
            raise TypeError(f"Expected `sharded` to be a bool, but got {sharded!r}.")
        self.sharded = sharded
        self.process_group = process_group
        self.norm_type = float(check_number("norm_type", norm_type, minimum=0.0, allow_inf=True))  # type: ignore[arg-type]
        self.on_nonfinite: OnNonFinite = check_choice("on_nonfinite", on_nonfinite, POLICIES)  # type: ignore[assignment]
        self.max_consecutive_skips = int(check_int("max_consecutive_skips", max_consecutive_skips, minimum=1))  # type: ignore[arg-type]
        self.group_by: GroupBy = check_choice("group_by", group_by, ("layer", "parameter"))  # type: ignore[assignment]
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.max_events = int(check_int("max_events", max_events, minimum=1))  # type: ignore[arg-type]
        self.explode_threshold = check_number("explode_threshold", explode_threshold, minimum=0.0, allow_none=True)
        self.spike_zscore = check_number("spike_zscore", spike_zscore, minimum=0.0, allow_none=True)
        self.spike_warmup = int(check_int("spike_warmup", spike_warmup, minimum=0))  # type: ignore[arg-type]
        self.vanish_threshold = float(check_number("vanish_threshold", vanish_threshold, minimum=0.0, strict=False))  # type: ignore[arg-type]
        self.vanish_ratio = check_number("vanish_ratio", vanish_ratio, minimum=0.0, allow_none=True)
        self.vanish_patience = int(check_int("vanish_patience", vanish_patience, minimum=1))  # type: ignore[arg-type]
        self.min_loss_scale = float(check_number("min_loss_scale", min_loss_scale, minimum=0.0, strict=False))  # type: ignore[arg-type]
        self.alert_every = int(check_int("alert_every", alert_every, minimum=1))  # type: ignore[arg-type]
        self.alerts = alerts.AlertRouter(self.alert_every, check_handlers(alert_handlers))
        self.emit = emit if emit is not None else self.alerts
        self.timesteps = make_tracker(track_timesteps, self.norm_type)
        self.timestep_vanish_ratio = check_ratio("timestep_vanish_ratio", timestep_vanish_ratio)
        self.timestep_history = int(check_int("timestep_history", timestep_history, minimum=1))  # type: ignore[arg-type]
        self.layers = LayerMap(self.group_by)
        self.clipping = ClipStage(clip)
        self.policy = StepPolicy(self.on_nonfinite, self.max_consecutive_skips, self.layers)
        self.skipper = DeviceSkip()
        self.detectors: list[Detector] = default_detectors(
            explode_threshold=self.explode_threshold,
            spike_zscore=self.spike_zscore,
            spike_warmup=self.spike_warmup,
            vanish_threshold=self.vanish_threshold,
            vanish_ratio=self.vanish_ratio,
            vanish_patience=self.vanish_patience,
            min_loss_scale=self.min_loss_scale,
            timestep_vanish_ratio=self.timestep_vanish_ratio,
        )
        self.history = TimestepHistory(self.timestep_history)
        self.skip_spikes = check_number("skip_spikes", skip_spikes, minimum=0.0, allow_none=True)
        if rollback is not None and not isinstance(rollback, Rollback):
            raise TypeError(
                f"Expected `rollback` to be a Rollback such as Rollback(every=100), or None, but got {rollback!r}."
            )
        if on_rollback is not None and not callable(on_rollback):
            raise TypeError(
                f"Expected `on_rollback` to be a callable taking the rollback event, or None, but got {on_rollback!r}."
            )
        self.rollback_options = rollback
        self.recovery = Recovery(rollback, self._record) if rollback is not None else None
        if self.recovery is not None:
            self.recovery.on_rollback = on_rollback
            self.recovery.targets.guard_state = self._run_state
            self.recovery.targets.load_guard_state = self._load_run_state
            self.policy.recover = self.recovery.on_skip_limit
        confirm = rollback.spike_zscore if rollback is not None else None
        spikes_on = self.skip_spikes is not None or confirm is not None
        patience = rollback.spike_patience if rollback is not None else 0
        self.spikes = DeviceSpikeStats(self.spike_warmup, new_level=max(8, patience + 1)) if spikes_on else None
        if not isinstance(track_updates, bool):
            raise TypeError(f"Expected `track_updates` to be a bool, but got {track_updates!r}.")
        self.updates = UpdateTracker(self.norm_type) if track_updates else None
        if not isinstance(replay, bool):
            raise TypeError(f"Expected `replay` to be a bool, but got {replay!r}.")
        self.replay = replay
        self._rng_before: dict[str, Any] | None = None  # the RNG state before the step's forward pass
        self._attrs_before: dict[str, Any] | None = None  # the model's attributes then (references)
        self._replayed: set[str] = set()  # the kinds already replayed (the first of each)
        # Under DDP, set by a communication hook: whether this rank's own gradients, before the
        # all-reduce averaged them, were non-finite (a replay names the faulty rank with it).
        self.local_grad_fault: Tensor | None = None
        self._model: nn.Module | None = None
        if track_updates:
            self.detectors.append(UpdateDetector(self.spike_zscore if self.spike_zscore is not None else 6.0))
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._last_number = -1
        # Under data parallelism: gathers every rank's profiles of a logging step (set by the adapter),
        # so that each profile is the whole batch's and identical on every rank.
        self.gather_profiles: Callable[[dict[str, list[float]]], list[dict[str, list[float]]]] | None = None
        self.kind_counts: dict[str, int] = {}
        self._events: deque[GradEvent] = deque(maxlen=self.max_events)
        self._pending: list[_Step] = []
        self._loss_finite: Tensor | None = None
        self._warned: set[str] = set()
        self.steps = 0
        self.empty_steps = 0  # steps with no gradient to measure (no optimizer, every parameter frozen)
        if model is not None:
            self.watch(model)

    # ------------------------------------------------------------------ setup
    def watch(self, model: nn.Module) -> None:
        """Name ``model``'s parameters by layer, record its forward order on the next forward, and
        attach the (dormant) per-timestep hooks to its recurrent modules."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module (or None), but got {model!r}.")
        self.layers.watch(model)
        self._model = model
        if self.recovery is not None:
            self.recovery.targets.model = model
        layers, params = self.layers.names()
        excluded = self.clip.unmatched_names(layers, params) if self.clip is not None else []
        if excluded:
            self._warn_once("clip-missing", unmatched(f"{self.clip!r}", excluded, layers, "layer or parameter"))
        if self.timesteps is not None:
            tracked = self.timesteps.watch(model)
            missing = sorted((self.timesteps.only or set()) - set(tracked))
            if missing:
                self._warn_once(
                    "ts-missing",
                    unmatched("track_timesteps", missing, self.timesteps.recurrent, "recurrent module"),
                )

    def prepare(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        *,
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
        gather_profiles: Callable[[dict[str, list[float]]], list[dict[str, list[float]]]] | None = None,
    ) -> None:
        """Everything before the first step, once the model's parameters are final: :meth:`watch`
        ``model``, let the clipper check each optimizer's placements, and (under data parallelism)
        set how a logging step's per-timestep profiles are gathered from every rank. With
        ``rollback``, the optimizers, ``schedulers`` and the fp16 ``scaler`` are what a snapshot holds
        besides the model (an optimizer first seen by :meth:`step` is added then).

        Raises:
            ValueError: the clipper cannot work on how a parameter is placed (e.g. AGC on a unit split
                across ranks).
        """
        self.watch(model)
        self.gather_profiles = gather_profiles
        for optimizer in optimizers:
            self.clipping.check(self.layers.layout(optimizer))
        dtensor = dtensor_type()
        if self.updates is not None and (
            self.sharded or (dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()))
        ):
            raise ValueError(
                "GradGuard: track_updates=True does not support sharded parameters yet (FSDP, tensor parallel): "
                "the update and weight norms would need the shards reduced. Use it under DDP or on one process."
            )
        if self.recovery is not None:
            targets = self.recovery.targets
            targets.optimizers, targets.schedulers, targets.scaler = list(optimizers), list(schedulers), scaler
            self.recovery.rank = self.recovery.ring.rank = rank()

    def config(self) -> dict[str, Any]:
        """The options the run is guarded with, as plain values: recorded with the run (TensorBoard),
        so that a report judges it by the thresholds it used.

        Example::

            >>> GuardCore(vanish_threshold=1e-6).config()["vanish_threshold"]
            1e-06
        """
        return {
            "vanish_threshold": self.vanish_threshold,
            "explode_threshold": self.explode_threshold,
            "timestep_vanish_ratio": self.timestep_vanish_ratio,
            "spike_zscore": self.spike_zscore,
            "norm_type": self.norm_type,
            "spike_warmup": self.spike_warmup,
            "vanish_ratio": self.vanish_ratio,
            "vanish_patience": self.vanish_patience,
            "min_loss_scale": self.min_loss_scale,
            "on_nonfinite": self.on_nonfinite,
            "max_consecutive_skips": self.max_consecutive_skips,
            "clip": repr(self.clip) if self.clip is not None else None,
            "skip_spikes": self.skip_spikes,
            "rollback": repr(self.rollback_options) if self.rollback_options is not None else None,
        }

    def unwatch(self) -> None:
        """Remove every hook the guard registered on the model."""
        self.layers.unwatch()
        self.skipper.remove()
        if self.timesteps is not None:
            self.timesteps.unwatch()

    def begin_step(self, step: int | None = None, log: bool | None = None) -> None:
        """Call before the forward pass(es) of an optimizer step, to arm per-timestep tracking.

        Only on logging steps are the timestep hooks armed; on other steps this costs one branch.
        Micro-batches of one optimizer step may call it each; their profiles combine. With ``replay``
        it also keeps the RNG state and references to the watched model's attributes (the last
        micro-batch's, which a replay starts from: no tensor is copied).
        """
        if self.replay:
            self._rng_before = capture_rng()
            self._attrs_before = keep_attributes(self._model)
        if self.timesteps is None:
            return
        step = self.steps if step is None else step
        if self.is_logging_step(step) if log is None else log:
            if self.timesteps.armed:
                self.timesteps.new_forward()
            else:
                self.timesteps.arm()
        elif self.timesteps.armed:
            self.timesteps.disarm()

    def observe_loss(self, loss: Tensor) -> None:
        """Note whether ``loss`` is finite (no host sync), so a non-finite loss is named the origin.

        Call it before each backward; micro-batches of one optimizer step combine.
        """
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        if self.spikes is not None:  # the loss's own spike statistics (the mean over micro-batches)
            value = loss.detach().float().mean()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1

    def note_batch(self, epoch: int, batch_idx: int) -> None:
        """Name the batch being trained (call before its forward; micro-batches each): the skip list
        records skipped and rolled-back batches by it, and a resumed run skips them again."""
        if self.recovery is not None:
            self.recovery.note_batch(epoch, batch_idx)

    def rollback(self, cause: str = "requested by hand") -> GradEvent:
        """Roll back now to the newest snapshot, in place (call it between optimizer steps).

        Returns:
            The ``rollback`` event.

        Raises:
            RuntimeError: the guard has no ``rollback`` option.
            RestoreError: no snapshot exists yet, or it cannot be restored.
            NonFiniteGradientError: ``max_rollbacks`` rollbacks were already made.
        """
        if self.recovery is None:
            raise RuntimeError(
                "GuardCore.rollback() needs the `rollback` option, e.g. GuardCore(rollback=Rollback(every=100))."
            )
        self.flush()
        event = self.recovery.rollback(max(self._last_number, 0), cause, manual=True)
        self.policy.consecutive_skips = 0
        return event

    def is_logging_step(self, step: int) -> bool:
        """Whether ``step`` is a logging step under ``log_every_n_steps``."""
        n = self.log_every_n_steps
        return n is not None and (step + 1) % n == 0

    # ------------------------------------------------------------------- step
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int | None = None,
        log: bool | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer_idx: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        log_next: bool | None = None,
        replay_closure: Callable[[], Any] | None = None,
        replay_precision: Callable[[], Any] | None = None,
    ) -> StepReport:
        """Measure, clip, read, decide, detect and report one optimizer step.

        Call it after backward and before ``optimizer.step()``.

        Args:
            optimizer: the optimizer about to step; its parameters are the ones guarded.
            step: the step number for events and cadence (default: this guard's call count).
            log: force (True) or suppress (False) the logging work; default follows
                ``log_every_n_steps``.
            scaler: the fp16 ``GradScaler``, if any. Call ``scaler.unscale_(optimizer)`` first; a
                fused optimizer that unscales inside ``step()`` is measured by dividing by the scale.
            optimizer_idx: recorded in events.
            reduce: sums a small flag tensor across ranks (e.g. ``all_reduce``), so that every rank
                takes the same decision. None on a single process.
            log_next: whether the next step logs (``track_updates`` copies the weights before this
                step's update then); default follows ``log_every_n_steps``.
            replay_closure: runs this step's forward pass again on its batch and returns the loss
                (``replay``): called only on the first faulty step, never on a healthy one. It runs
                with the watched model's attributes as they were at :meth:`begin_step` (a hidden state
                the step reassigned, ``self.hidden = h.detach()``, is the one the step began with), and
                the step's own values are put back afterwards. State the closure holds elsewhere, or
                tensors the step changed in place, are the closure's to keep as they were.
            replay_precision: the run's autocast context factory (e.g. ``lambda: torch.autocast("cuda",
                torch.bfloat16)``), so that a replay can compare reduced precision with float32.

        Returns:
            A :class:`StepReport`.

        Raises:
            NonFiniteGradientError: under ``on_nonfinite="raise"`` on a non-finite step, or when
                ``max_consecutive_skips`` steps in a row were skipped.
        """
        number = self.steps if step is None else step
        self._last_number = number
        is_log = self.is_logging_step(number) if log is None else log
        if self.recovery is not None:
            why = self._recovery_begin(optimizer, number)
            if why is not None:
                return self._forced_skip(optimizer, number)
        layout = self.layers.layout(optimizer)
        m = measure_step(
            layout, self.norm_type, sharded=self.sharded, process_group=self.process_group,
            optimizer=optimizer, scaler=scaler, warn=self._warn_once, loss_finite=self._take_loss_flag(),
        )  # fmt: skip
        if m is None:
            return self._nothing_to_measure(number)
        s = _Step(number, optimizer_idx, layout, m.norms, m.owners, m.total, is_log, HostRead())
        ctx = self.clipping.context(m, layout, self.norm_type, is_log)
        level = self.clipping.clip_now(ctx, m, s.read)
        flags = self._register_head(s, m, level, reduce)
        kept = (replay_closure, replay_precision, self._rng_before, self._attrs_before)
        s.replay = kept if replay_closure is not None else None
        on_device = self.policy.on_device(optimizer, is_log, self.clipping.needs_host, m.loss_scale is not None)
        if on_device:  # a non-finite step is skipped by the optimizer itself: no read needed now
            self.skipper.arm(optimizer, flags)
        else:
            self.skipper.disarm(optimizer)
        self._register_logged(s, m.loss_scale)
        if self.updates is not None:
            if is_log:  # the update that led into this step, then (below) the weights before this one
                s.update_ids = self.updates.register(s.read, optimizer, layout)
            if self.is_logging_step(number + 1) if log_next is None else log_next:
                self.updates.keep_before(optimizer, layout)  # measured at the next (logging) step
        if self.policy.defers(is_log, self.clipping.needs_host, on_device):
            return self._defer(s)
        pending, self._pending = self._pending, []
        # The one deliberate host sync of the step: the skip decision needs the flags.
        HostRead.read_all([s.read, *(p.read for p in pending)])
        stop = [self._settle_deferred(p).should_stop for p in pending]
        self._advance()
        report = StepReport(number, m.total, logged=is_log)
        verdict = self._decide(s, report)
        report.should_stop = report.should_stop or any(stop)  # a step skipped on the device under "stop"
        if self.recovery is not None:
            self._recovery_end(optimizer, s, report, verdict)
        late = self.clipping.clip_late(ctx, verdict.finite)
        if is_log:
            self._fill_metrics(report, s, late)
        self._detect(s, report, verdict)
        if self.recovery is not None and not report.rolled_back:
            self._maybe_capture(s, report, verdict)  # after the detectors: every statistic as of this step
        return report

    def flush(self) -> None:
        """Read and report the flags of steps deferred under ``on_nonfinite="warn"`` (one host sync).

        Called by the next logging step, :meth:`summary`, :meth:`state_dict` and the Lightning
        adapter at the end of training; call it yourself before reading counters mid-run.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        HostRead.read_all(p.read for p in pending)
        for p in pending:
            self._settle_deferred(p)

    def close(self, timeout: float | None = None) -> None:
        """The end of a run: :meth:`flush` deferred steps, then let the alert notifiers (a webhook) send
        what is queued, waiting at most their ``close_timeout`` (or ``timeout``) seconds."""
        try:
            self.flush()
        finally:
            self.alerts.close(timeout)

    # --------------------------------------------------------------- recovery
    def _recovery_begin(self, optimizer: torch.optim.Optimizer, number: int) -> str | None:
        """Before the step's measurement: the first snapshot, and a batch to skip without a look."""
        rec = self.recovery
        assert rec is not None
        targets = rec.targets
        if targets.model is None:
            raise RuntimeError(
                "GuardCore(rollback=...) needs the model: pass it to GuardCore(model, ...) or to prepare()."
            )
        if optimizer not in targets.optimizers:  # a new optimizer: every snapshot must hold it
            targets.optimizers = [*targets.optimizers, optimizer]
            rec.ring.clear()
        why = rec.begin(number)
        rec.first(number)
        return why

    def _forced_skip(self, optimizer: torch.optim.Optimizer, number: int) -> StepReport:
        """Skip a step without measuring it (a batch after a rollback, or on the resumed skip list)."""
        self.skipper.disarm(optimizer)
        _drop_grads([optimizer])
        self.policy.skipped_steps += 1
        self._take_loss_flag()
        self._take_loss_value()
        self._advance()
        return StepReport(number, torch.zeros(()), skipped=True)

    def _recovery_end(self, optimizer: torch.optim.Optimizer, s: _Step, report: StepReport, verdict: Verdict) -> None:
        """After the step's decision: roll back if a trigger fired."""
        rec = self.recovery
        assert rec is not None
        if rec.cause is not None:
            self.skipper.disarm(optimizer)
            _drop_grads([optimizer, *rec.targets.optimizers])
            if not report.skipped:
                self.policy.skipped_steps += 1
            report.event = rec.rollback(s.number, rec.cause)
            report.skipped, report.rolled_back = True, True
            self.policy.consecutive_skips = 0

    def _maybe_capture(self, s: _Step, report: StepReport, verdict: Verdict) -> None:
        """A snapshot when one is due, on a healthy step: taken once the step is settled and detected,
        so that the clipper's and the detectors' statistics all include this step."""
        rec = self.recovery
        assert rec is not None
        healthy = verdict.finite and not verdict.spike_high and not report.skipped
        healthy = healthy and self.policy.consecutive_skips == 0
        if healthy and not rec.suspicious and rec.due(s.number):
            rec.capture(s.number)

    def _replaying(self, s: _Step) -> Callable[[GradEvent], GradEvent]:
        """The recorder of this step's events: the first ``nonfinite`` and ``spike_skipped`` event are
        replayed first (every rank replays its own batch; the verdicts are gathered)."""

        def record(event: GradEvent) -> GradEvent:
            if event.kind not in ("nonfinite", "spike_skipped") or event.kind in self._replayed:
                return self._record(event)
            self._replayed.add(event.kind)
            result = self._attribute(s, event)
            if result is None:
                return self._record(event)
            extra = {**event.extra, "replay": result}
            return self._record(dataclasses.replace(event, message=f"{event.message} {describe(result)}", extra=extra))

        return record

    def _attribute(self, s: _Step, event: GradEvent) -> dict[str, Any] | None:
        if s.replay is None:
            return None
        closure, precision, rng, attrs = s.replay
        if attrs is not None and self._model is not None:
            closure = replaying_from(self._model, attrs, closure)
        spike = float(event.value) if event.kind == "spike_skipped" else None
        mine = attribute(closure, s.layout.params, model=self._model, rng=rng, precision=precision,
                         spike_norm=spike)  # fmt: skip
        mine["local_fault"] = bool(s.local_bad.sum() > 0) if s.local_bad is not None else True
        return _gather_verdicts(mine)

    def _run_state(self) -> dict[str, Any]:
        """The guard's state a snapshot keeps: the clipper's and the detectors' statistics (its counters
        and events go on counting through a rollback)."""
        return {
            "clip": self.clipping.state_dict(),
            "detectors": {d.state_key: state_of(d) for d in self.detectors if d.state_key},
            "spikes": self.spikes.copy_state() if self.spikes is not None else None,
        }

    def _load_run_state(self, state: dict[str, Any]) -> None:
        self.clipping.load_state_dict(state.get("clip", {}), self.clipping.clipped_steps, self.steps)
        saved = state.get("detectors", {})
        for detector in self.detectors:
            load = getattr(detector, "load_state_dict", None)
            if detector.state_key in saved and callable(load):
                load(saved[detector.state_key])
        if self.spikes is not None:
            self.spikes.set_state(state.get("spikes"))

    # ----------------------------------------------------------------- stages
    def _register_head(
        self, s: _Step, m: Measurement, level: Tensor, reduce: Callable[[Tensor], Tensor] | None
    ) -> Tensor:
        """Register every step's values: the flags (summed across ranks by ``reduce``), the total norm,
        the loss scale, the clip level. One stack on one process; under DDP the flags are a stack of
        their own (one small collective). Returns the flags vector (:data:`FLAGS` order)."""
        bad = device_flags(m, m.loss_finite)
        scale = m.loss_scale.to(m.zero.device).reshape(()).float() if m.loss_scale is not None else m.zero
        loss = self._take_loss_value()
        z = self._spike_flags(bad, m, loss)
        watch = [m.total.to(m.zero.device, torch.float32), scale, level, z]
        if reduce is None or m.shared_flags is not None:  # flags the same on every rank already
            if reduce is not None and self.spikes is not None:  # but each rank scored its own loss
                bad[3:5] = list(reduce(torch.stack(bad[3:5])).unbind())
            head = torch.stack([*bad, *watch])
            s.read.put_each(FLAGS + _WATCH, head)
            flags = head[: len(FLAGS)]
        else:
            own, self.local_grad_fault = self.local_grad_fault, None
            grad_bad = bad[0] if own is None else own.to(bad[0].device, torch.float32)
            s.local_bad = torch.stack([grad_bad, bad[1]])  # this rank's own faults (a replay names it)
            flags = reduce(torch.stack(bad))
            s.read.put_each(FLAGS, flags)
            s.read.put_each(_WATCH, torch.stack(watch))
        if self.spikes is not None:  # only steps with no flag at all (on any rank) feed the statistics
            self.spikes.update(m.total, loss, keep=flags.sum() == 0, spiked=(flags[3] + flags[4]) > 0)
        return flags

    def _spike_flags(self, bad: list[Tensor], m: Measurement, loss: Tensor | None) -> Tensor:
        """Set the spike flags of ``bad`` from the device statistics (no host sync); the step's
        z-score (the larger of the norm's and the loss's), or zero without a spike check."""
        if self.spikes is None:
            return m.zero
        z = self.spikes.zscores(m.total, loss).max().to(m.zero.device)
        one = torch.ones_like(m.zero)
        if self.skip_spikes is not None:
            bad[3] = torch.where(z > self.skip_spikes, one, m.zero)
        confirm = self.rollback_options.spike_zscore if self.rollback_options is not None else None
        if confirm is not None:
            bad[4] = torch.where(z > confirm, one, m.zero)
        return z

    def _register_logged(self, s: _Step, loss_scale: Tensor | None) -> None:
        """On a logging step, add the per-layer norms (and weights, and per-timestep profiles) to the read."""
        tracker = self.timesteps
        if not s.logged:
            if tracker is not None and tracker.armed:
                tracker.disarm()
            return
        s.layer_ids, per_layer = layer_norms(s.norms, s.owners, s.layout, self.norm_type)
        s.read.put("layers", per_layer)
        if self.vanish_ratio is not None:
            s.read.put("weights", weight_norms(s.norms, s.owners, s.layout, self.norm_type))
        if tracker is not None and tracker.armed:
            profiles = tracker.collect(loss_scale)
            for name, profile in profiles.items():
                s.read.put(f"timestep/{name}", profile)
            s.profiles = list(profiles)

    def _decide(self, s: _Step, report: StepReport) -> Verdict:
        """Act on the step's flags (skip, warn, raise, stop); record its decision event."""
        read = s.read
        verdict, total = Verdict.of(read), read["total"]
        self.clipping.observe(total, verdict.finite, read[CLIP_LEVEL])
        def fault() -> Fault:
            params = () if s.deferred else s.layout.params  # a deferred step's gradients belong to a later one
            return Fault(s.number, report.total_norm, s.norms, s.owners, s.layout, params, s.optimizer_idx)

        record = self._record if s.deferred or not self.replay else self._replaying(s)
        report.event, report.skipped = self.policy.decide(verdict, total, fault, record)
        report.amp_overflow, report.nonfinite = verdict.amp_bad, verdict.nonfinite
        report.should_stop = verdict.nonfinite and self.on_nonfinite == "stop"
        if self.recovery is not None:
            why = None if not report.skipped else "spike" if verdict.spike_skip and verdict.finite else "nonfinite"
            self.recovery.observe(s.number, verdict.loss_bad, verdict.spike_high, why)
        return verdict

    def _fill_metrics(self, report: StepReport, s: _Step, late: HostRead | None) -> None:
        """Every metric of a logging step, from its host values."""
        read, p = s.read, METRIC_PREFIX
        total = read["total"]
        metrics = {f"{p}total_norm": total}
        metrics.update(self.clipping.metrics(late if late is not None else read, total, self.steps, p))
        report.layer_norms, per_layer = layer_metrics(s.layout.layer_names, s.layer_ids, read.vector("layers"))
        metrics.update(per_layer)
        metrics[f"{p}skipped_steps"] = float(self.policy.skipped_steps)
        metrics[f"{p}nonfinite_steps"] = float(self.policy.nonfinite_steps)
        profiles = {name: read.vector(f"timestep/{name}") for name in s.profiles}
        if self.gather_profiles is not None and self.timesteps is not None:  # every rank, every logging step
            profiles = combine_profiles(self.gather_profiles(profiles), self.norm_type)
            s.profiles = list(profiles)
        for name, values in profiles.items():
            self.history.add(report.step, name, values)
            report.timesteps[name] = self.history.norms[name]
        metrics.update(timestep_metrics({name: self.history.summaries[name] for name in s.profiles}))
        if s.update_ids:
            names = [s.layout.layer_names[i] for i in s.update_ids]
            metrics[f"{p}update_ratio"] = read["update_total"]
            for key in UPDATE_KEYS:
                if key in read:
                    metrics.update({f"{p}{key}/{n}": v for n, v in zip(names, read.vector(key), strict=True)})
        report.metrics = metrics
        report.layer_order = self.layers.forward_names(s.layout)
        report.timestep_heat = self.history.heat
        report.layout = s.layout

    def _detect(self, s: _Step, report: StepReport, verdict: Verdict) -> None:
        """Run every detector on the step's host values; record what they find."""
        read, layout = s.read, s.layout
        finite = verdict.finite and not verdict.spike_skip  # a skipped spike feeds no statistics
        obs = Observation(
            s.number, s.optimizer_idx, read["total"], finite, verdict.nonfinite, read["loss_scale"],
            logged=s.logged, layer_norms=report.layer_norms,
            layers_now=lambda: layer_norms_now(s.norms, s.owners, layout, self.norm_type),
        )  # fmt: skip
        if s.logged:
            if "weights" in read:
                names = (layout.layer_names[i] for i in s.layer_ids)
                obs.weight_norms = dict(zip(names, read.vector("weights"), strict=True))
            obs.unused = [] if verdict.nonfinite else layout.unused(s.layer_ids)
            obs.timestep_summaries = {name: self.history.summaries[name] for name in s.profiles}
            if s.update_ids:
                measured = [layout.layer_names[i] for i in s.update_ids]
                obs.updates = {
                    "total": read["update_total"],
                    "layers": dict(zip(measured, read.vector("update_ratio"), strict=True)),
                    "sqrt_v_min": dict(zip(measured, read.vector("sqrt_v_min"), strict=True))
                    if "sqrt_v_min" in read
                    else {},
                }
        for detector in self.detectors:
            for event in detector.detect(obs):
                self._record(event)
                if detector.headline:
                    report.event = event

    def _settle_deferred(self, s: _Step) -> StepReport:
        report = StepReport(s.number, s.total.float())  # as read: the float32 total
        self._detect(s, report, self._decide(s, report))
        return report

    def _defer(self, s: _Step) -> StepReport:
        """Keep the step's read for later: nothing on the host depends on it now (no sync)."""
        s.deferred = True
        self._pending.append(s)
        self._advance()
        if len(self._pending) >= _PENDING_LIMIT:  # bound the memory of a run that never logs
            self.flush()
        return StepReport(s.number, s.total, deferred=True)

    def _nothing_to_measure(self, number: int) -> StepReport:
        self._warn_once(
            "empty", "GradGuard: the optimizer has no parameter with a gradient this step; nothing to measure."
        )
        self.empty_steps += 1
        self._advance()
        return StepReport(number, torch.zeros(()))

    def _advance(self) -> None:
        self.steps += 1
        self.layers.freeze_order()

    def _take_loss_flag(self) -> Tensor | None:
        flag, self._loss_finite = self._loss_finite, None
        return flag

    def _take_loss_value(self) -> Tensor | None:
        total, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return None if total is None else total / count

    def _record(self, event: GradEvent) -> GradEvent:
        self._events.append(event)
        self.kind_counts[event.kind] = self.kind_counts.get(event.kind, 0) + 1
        self.emit(event)
        return event

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if alerts.is_rank_zero():
                alerts.warn(message)

    # ------------------------------------------------------------- reporting
    @property
    def clip(self) -> Clipper | None:
        """The clipper, or None."""
        return self.clipping.clip

    @property
    def spike(self) -> LogNormStats | None:
        """The spike detector's statistics of log(total norm), or None when ``spike_zscore`` is None."""
        found = [d.stats for d in self.detectors if isinstance(d, SpikeDetector)]
        return found[0] if found else None

    @property
    def rollbacks(self) -> int:
        """Rollbacks made so far (0 without the ``rollback`` option)."""
        return self.recovery.rollbacks if self.recovery is not None else 0

    @property
    def skip_list(self) -> list[dict[str, Any]]:
        """The skipped and rolled-back batches, one entry each: ``{"epoch", "batch_idx", "step", "reason",
        "steps", "reasons"}`` (``step`` and ``reason``: the first of ``steps`` and ``reasons``)."""
        return list(self.recovery.skips) if self.recovery is not None else []

    @property
    def spike_skipped_steps(self) -> int:
        """Finite steps skipped as spikes (``skip_spikes``)."""
        return self.policy.spike_skipped_steps

    @property
    def events(self) -> list[GradEvent]:
        """The recorded events, oldest first (at most ``max_events``)."""
        return list(self._events)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far."""
        return self.policy.skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        """Steps with a non-finite gradient or loss so far."""
        return self.policy.nonfinite_steps

    @property
    def consecutive_skips(self) -> int:
        """Skipped steps in a row, up to now."""
        return self.policy.consecutive_skips

    @property
    def amp_overflow_steps(self) -> int:
        """fp16 overflows the GradScaler handled so far."""
        return self.policy.amp_overflow_steps

    @property
    def origins(self) -> dict[str, int]:
        """How often each origin began a non-finite step."""
        return self.policy.origins

    @property
    def timestep_norms(self) -> dict[str, Tensor]:
        """Each tracked sequence's per-timestep norms at the last logging step (1-D CPU tensors)."""
        return self.history.norms

    @property
    def timestep_summaries(self) -> dict[str, dict[str, float]]:
        """Each tracked sequence's profile summary at the last logging step."""
        return self.history.summaries

    @property
    def timestep_heat(self) -> dict[str, deque[tuple[int, Tensor]]]:
        """Each tracked sequence's recent (step, profile) pairs."""
        return self.history.heat

    @property
    def max_total_norm(self) -> float:
        """The largest finite total norm (before clipping) seen so far."""
        self.flush()
        return self.policy.max_total_norm

    @property
    def clipped_steps(self) -> int:
        """How many steps the clipper changed (a deferred clipper's count costs one host read)."""
        self.flush()
        return self.clipping.clipped_steps

    def summary(self) -> str:
        """A one-paragraph summary of the run so far.

        Example::

            >>> GuardCore().summary()
            'GradGuard summary: 0 optimizer steps guarded; no clipping configured; 0 skipped; 0 non-finite steps.'
        """
        self.flush()
        quiet = sum(self.alerts.suppressed.values())
        return summarize_run(self.steps, self.clip, self.clipped_steps, self.policy, self.kind_counts, quiet,
                             empty_steps=self.empty_steps, undelivered=self.alerts.undelivered())  # fmt: skip

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, clipper and detector state, as plain values (the format of version 0.2.0)."""
        self.flush()
        detected: dict[str, Any] = {"rate": {}, "spike": {}, "layers": {}} | {
            d.state_key: state_of(d) for d in self.detectors if d.state_key
        }
        # The format of 0.2.0 keeps the spike detector's per-layer EMA with the layers' state.
        spike = detected["spike"] = dict(detected["spike"])
        detected["layers"] = {**detected["layers"], "log_ema": spike.pop("log_ema", {})}
        extra: dict[str, Any] = {}
        if self.recovery is not None:
            extra["recovery"] = self.recovery.state_dict()
        if self.empty_steps:  # only when it happened: a run with gradients keeps 0.2.0's format
            extra["empty_steps"] = self.empty_steps
        if self.spikes is not None:  # only with the options: a run without them keeps 0.2.0's format
            extra["spike_device"] = self.spikes.state_dict()
            extra["spike_skipped_steps"] = self.policy.spike_skipped_steps
        return {
            "version": 1,
            "steps": self.steps,
            **self.policy.state_dict(),
            "clipped_steps": self.clipped_steps,
            "clip": self.clipping.state_dict(),
            **detected,
            "alerts": self.alerts.state_dict(),
            "kinds": dict(self.kind_counts),
            **extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys (older checkpoints) keep their defaults."""
        self.steps = int(state.get("steps", self.steps))
        self.empty_steps = int(state.get("empty_steps", 0))
        self.policy.load_state_dict(state)
        self.clipping.load_state_dict(state.get("clip", {}), int(state.get("clipped_steps", 0)), self.steps)
        layers = state.get("layers", {})  # the spike detector's per-layer EMA is kept there (see state_dict)
        state = {**state, "spike": {**state.get("spike", {}), "log_ema": layers.get("log_ema", {})}}
        for detector in self.detectors:
            load = getattr(detector, "load_state_dict", None)
            if detector.state_key and callable(load):
                load(state.get(detector.state_key, {}))
        self.alerts.load_state_dict(state.get("alerts", {}))
        self.kind_counts = {str(k): int(v) for k, v in dict(state.get("kinds", {})).items()}
        if self.recovery is not None:  # a resumed run: its skip list is skipped again
            self.recovery.load_state_dict(state.get("recovery", {}))
        if self.spikes is not None and "spike_device" in state:
            self.spikes.load_state_dict(state["spike_device"])


def _gather_verdicts(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's replay, gathered (a collective: every rank replays the same step); the verdict of
    the run is a rank's that reproduced the fault, else ``transient``, naming the faulty ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {**mine, "faulty_ranks": [mine["rank"]]}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    reproduced = [r for r in everyone if r["verdict"] != "transient"]
    chosen = reproduced[0] if reproduced else next((r for r in everyone if r["local_fault"]), mine)
    faulty = [r["rank"] for r in everyone if r["local_fault"]]
    return {**chosen, "faulty_ranks": faulty, "ranks": everyone}


def _drop_grads(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Skip the step for these optimizers: every gradient to None (torch optimizers then do nothing)."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None

