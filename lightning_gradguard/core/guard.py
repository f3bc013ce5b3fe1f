"""The framework-free guard: one optimizer step as a short pipeline of stages, and components.

:class:`GuardCore` imports torch only. The Lightning callback
(:class:`lightning_gradguard.GradGuard`) is a thin adapter over it, and a plain PyTorch loop uses it
directly::

    guard = GuardCore(model, clip=NormClip(max_norm=1.0))
    for batch in loader:
        guard.begin_step()                # optional: keeps the RNG state for a replay of a fault
        optimizer.zero_grad()
        loss = model(batch)
        guard.observe_loss(loss)          # optional: lets a NaN loss be named as the origin
        loss.backward()
        report = guard.step(optimizer)    # measure, clip, read, decide, detect, report
        if not report.skipped:
            optimizer.step()

Under fp16 AMP call ``scaler.unscale_(optimizer)`` first, then ``guard.step(optimizer,
scaler=scaler)``, then ``scaler.step(optimizer)``.

One step (``ARCHITECTURE.md`` has the diagram, with the components' hooks where they run)::

    gate -> measure (measure.py) -> clip (clipping.py) -> register, flags summed across ranks
        -> read (hostread.py) -> decide (decide.py) -> settle -> report (step_report.py)
        -> detect (../detectors/) -> end

Every stage before the read works on the device; the read is the step's one host sync, and each
stage gets its host values back by name. A capability (rollback, the spike statistic, update
tracking, replay, per-timestep tracking, a user's) is a :class:`~lightning_gradguard.GuardComponent`
built from its option in ``options.py``: it plugs into these stages by its hooks, and this module
knows none of them.

Cost: every step, one ``_foreach_norm`` per (device, dtype) group, a few device reductions, the
clip, and exactly one host sync (reading the flags, which the skip decision needs). On logging
steps the per-layer norms are one extra scatter on the device and ride along in that same sync.
Only a faulty step pays more (to list its non-finite layers).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard._validate import check_choice, check_handlers, check_int, check_number, check_ratio
from lightning_gradguard.clip import Clipper
from lightning_gradguard.core import alerts
from lightning_gradguard.core.checkpoints import Checkpoints
from lightning_gradguard.core.clipping import CLIP_LEVEL, ClipStage
from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
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
from lightning_gradguard.core.options import build_components, build_detectors
from lightning_gradguard.core.readouts import GuardReadouts
from lightning_gradguard.core.recovery import Rollback, rank
from lightning_gradguard.core.replicas import Replicas
from lightning_gradguard.core.snapshot import RestoreError
from lightning_gradguard.core.state import GuardState
from lightning_gradguard.core.step_report import METRIC_PREFIX, StepReport, layer_metrics
from lightning_gradguard.detectors import Detector, Observation
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.layout import LayerMap
from lightning_gradguard.primitives.text import unmatched

__all__ = ["METRIC_PREFIX", "GuardCore", "OnNonFinite", "RestoreError", "Rollback", "StepReport"]

GroupBy = Literal["layer", "parameter"]
_WATCH = ("total", "loss_scale", CLIP_LEVEL)  # read with the flags on every step
_PENDING_LIMIT = 256  # deferred steps kept before a read is forced (a run that never logs)
_CHECKPOINTS = Checkpoints()  # the checkpoint gate is on by default


class GuardCore(GuardReadouts, GuardState):
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
        checkpoints: the checkpoint gate (:class:`~lightning_gradguard.Checkpoints`, on by default): a
            save of an unhealthy state is deferred or skipped, a rollback quarantines the checkpoints
            it undid, a resume from a bad checkpoint is refused (``docs/checkpoints.md``); None: off.
        replicas: the replica check (:class:`~lightning_gradguard.Replicas`): under data parallelism,
            on logging steps (or every ``every`` steps), a bit-exact checksum of each layer's parameters
            on every rank, gathered with the step's flags; a ``replica_divergence`` event names the odd
            ranks, then ``action`` (warn, repair, rollback, stop; ``docs/replicas.md``). Default None: off.
        components: your own :class:`~lightning_gradguard.GuardComponent` instances, each plugged in
            by its hooks beside the built-in ones (``docs/writing-a-component.md``); default none.

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
        checkpoints: Checkpoints | None = _CHECKPOINTS,
        replicas: Replicas | None = None,
        components: Sequence[GuardComponent] | None = (),
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module (or None), but got {model!r}.")
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
        self.timestep_vanish_ratio = check_ratio("timestep_vanish_ratio", timestep_vanish_ratio)
        self.timestep_history = int(check_int("timestep_history", timestep_history, minimum=1))  # type: ignore[arg-type]
        self.skip_spikes, self.rollback_options, self.replay = skip_spikes, rollback, replay
        self.alerts = alerts.AlertRouter(self.alert_every, check_handlers(alert_handlers))
        self.emit = emit if emit is not None else self.alerts
        self.layers = LayerMap(self.group_by)
        self.clipping = ClipStage(clip)
        self.policy = StepPolicy(self.on_nonfinite, self.max_consecutive_skips, self.layers, self._on_skip_limit)
        self.skipper = DeviceSkip()
        self.detectors: list[Detector] = build_detectors(
            explode_threshold=self.explode_threshold, spike_zscore=self.spike_zscore,
            vanish_threshold=self.vanish_threshold, vanish_ratio=self.vanish_ratio,
            vanish_patience=self.vanish_patience, min_loss_scale=self.min_loss_scale,
            timestep_vanish_ratio=self.timestep_vanish_ratio,
        )  # fmt: skip
        self.components: list[GuardComponent] = build_components(
            norm_type=self.norm_type, track_timesteps=track_timesteps, timestep_history=self.timestep_history,
            spike_zscore=self.spike_zscore, spike_warmup=self.spike_warmup, skip_spikes=skip_spikes,
            rollback=rollback, on_rollback=on_rollback, track_updates=track_updates, replay=replay,
            checkpoints=checkpoints, replicas=replicas, components=components,
        )  # fmt: skip
        self._needs_host = any(c.needs_host for c in self.components)
        self._setup = Setup(record=self._record, guard_state=self._snapshot_state,
                            load_guard_state=self._load_snapshot_state)  # fmt: skip
        self.kind_counts: dict[str, int] = {}
        self._events: deque[GradEvent] = deque(maxlen=self.max_events)
        self._pending: list[StepContext] = []
        self._loss_finite: Tensor | None = None
        self._warned: set[str] = set()
        self._last_number = -1
        self._optimizers: list[torch.optim.Optimizer] = []  # every optimizer stepped so far
        self.steps = 0
        self.empty_steps = 0  # steps with no gradient to measure (no optimizer, every parameter frozen)
        if model is not None:
            self.watch(model)

    # ------------------------------------------------------------------ setup
    def watch(self, model: nn.Module) -> None:
        """Name ``model``'s parameters by layer, record its forward order on the next forward, and
        set the components up with it (the per-timestep hooks, dormant until a logging step)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module (or None), but got {model!r}.")
        self.layers.watch(model)
        self._setup.model = model
        layers, params = self.layers.names()
        excluded = self.clip.unmatched_names(layers, params) if self.clip is not None else []
        if excluded:
            self._warn_once("clip-missing", unmatched(f"{self.clip!r}", excluded, layers, "layer or parameter"))
        for c in self.components:
            c.setup(self._setup)

    def prepare(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        *,
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
        gather_profiles: Callable[[Any], list[Any]] | None = None,
        log_dir: str | None = None,
    ) -> None:
        """Everything before the first step, once the model's parameters are final: :meth:`watch`
        ``model``, let the clipper check each optimizer's placements, and set the components up with
        the run's objects: the optimizers, ``schedulers`` and the fp16 ``scaler`` (what a rollback's
        snapshot holds besides the model; an optimizer first seen by :meth:`step` is added then),
        ``gather_profiles`` (under data parallelism, how a host object is gathered from every rank)
        and ``log_dir`` (where the run writes its files: the skip list).

        Raises:
            ValueError: a placement the clipper cannot work on (e.g. AGC on a unit split across ranks),
                a fused optimizer whose scaled gradients a deferred clipper cannot clip, or a component
                that refuses the run (``track_updates`` on sharded parameters).
        """
        import torch.distributed as dist

        self.clipping.check_scaled(optimizers, scaler)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._setup = Setup(
            model=model, optimizers=list(optimizers), schedulers=list(schedulers), scaler=scaler, rank=rank(),
            world_size=world, sharded=self.sharded or _has_dtensor(model), log_dir=log_dir, gather=gather_profiles,
            record=self._record, guard_state=self._snapshot_state, load_guard_state=self._load_snapshot_state,
        )  # fmt: skip
        self.watch(model)
        for optimizer in optimizers:  # once the layers are named
            self.clipping.check(self.layers.layout(optimizer))

    def config(self) -> dict[str, Any]:
        """The options the run is guarded with, as plain values: recorded with the run (TensorBoard),
        so that a report judges it by the thresholds it used.

        Example::

            >>> GuardCore(vanish_threshold=1e-6).config()["vanish_threshold"]
            1e-06
        """
        out = {
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
        for c in self.components:
            out.update(c.config())
        return out

    def unwatch(self) -> None:
        """Remove every hook the guard and its components registered."""
        self.layers.unwatch()
        self.skipper.remove()
        for c in self.components:
            c.teardown()

    def component(self, name: str) -> GuardComponent | None:
        """The component of this name (``"recovery"``, ``"spike"``, ``"updates"``, ``"replay"``,
        ``"timesteps"``, or one of yours), or None."""
        return next((c for c in self.components if c.name == name), None)

    def begin_step(self, step: int | None = None, log: bool | None = None) -> None:
        """Call before the forward pass(es) of an optimizer step: the components prepare it (the
        per-timestep hooks are armed on logging steps only; ``replay`` keeps the RNG state and
        references to the watched model's attributes, the last micro-batch's, which a replay starts
        from: no tensor is copied). Micro-batches of one optimizer step may call it each."""
        step = self.steps if step is None else step
        logging = self.is_logging_step(step) if log is None else log
        for c in self.components:
            c.begin_step(step, logging)

    def observe_loss(self, loss: Tensor) -> None:
        """Note whether ``loss`` is finite (no host sync), so a non-finite loss is named the origin.

        Call it before each backward; micro-batches of one optimizer step combine.
        """
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        for c in self.components:
            c.observe_loss(loss)

    def note_batch(self, epoch: int, batch_idx: int) -> None:
        """Name the batch being trained (call before its forward; micro-batches each): the skip list
        records skipped and rolled-back batches by it, and a resumed run skips them again."""
        for c in self.components:
            c.note_batch(epoch, batch_idx)

    def rollback(self, cause: str = "requested by hand") -> GradEvent:
        """Roll back now to the newest snapshot, in place (call it between optimizer steps).

        Returns:
            The ``rollback`` event.

        Raises:
            RuntimeError: the guard has no ``rollback`` option.
            RestoreError: no snapshot exists yet, or it cannot be restored.
            NonFiniteGradientError: ``max_rollbacks`` rollbacks were already made.
        """
        recovery: Any = self.component("recovery")
        if recovery is None:
            raise RuntimeError(
                "GuardCore.rollback() needs the `rollback` option, e.g. GuardCore(rollback=Rollback(every=100))."
            )
        self.flush()
        event: GradEvent = recovery.rollback(max(self._last_number, 0), cause, manual=True, record=self.record)
        self.policy.restart_streak()
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
        number = self._last_number = self.steps if step is None else step
        logging = self.is_logging_step(number) if log is None else log
        ctx = StepContext(
            number, optimizer, optimizer_idx, self.layers.layout(optimizer), logging=logging,
            log_next=self.is_logging_step(number + 1) if log_next is None else log_next,
            replay_closure=replay_closure, replay_precision=replay_precision, record=self._record_in,
            skip=self._skip_settled,
        )  # fmt: skip
        if optimizer not in self._optimizers:
            self._optimizers.append(optimizer)
        gated = [why for c in self.components if (why := c.gate(ctx)) is not None]
        if gated:  # a component skips the step without a look (a batch of the skip list)
            return self._skip_unmeasured(ctx)
        m = ctx.measurement = self._measure(ctx, scaler)
        if m is None:
            return self._nothing_to_measure(number)
        clip = self.clipping.context(m, ctx.layout, self.norm_type, logging)
        level = self.clipping.clip_now(clip, m, ctx.read)
        on_device = self._register(ctx, m, level, reduce)
        if self.policy.defers(logging, self.clipping.needs_host or self._needs_host, on_device):
            return self._defer(ctx)
        pending, self._pending = self._pending, []
        HostRead.read_all([ctx.read, *(p.read for p in pending)])  # the step's one deliberate host sync
        stop = [self._settle_deferred(p).should_stop for p in pending]
        self._advance()
        report = StepReport(number, m.total, logged=logging)
        self._decide(ctx, report)
        report.should_stop = report.should_stop or any(stop)  # a step skipped on the device under "stop"
        late = self.clipping.clip_late(clip, ctx.verdict is not None and ctx.verdict.finite)
        if logging:
            self._report(ctx, late)
        self._detect(ctx)
        for c in self.components:
            c.end_step(ctx)
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

    # ----------------------------------------------------------------- stages
    def _measure(self, ctx: StepContext, scaler: Any) -> Measurement | None:
        flag, self._loss_finite = self._loss_finite, None
        m = measure_step(
            ctx.layout, self.norm_type, sharded=self.sharded, process_group=self.process_group,
            optimizer=ctx.optimizer, scaler=scaler, warn=self._warn_once, loss_finite=flag,
        )  # fmt: skip
        if m is not None:
            ctx.norms, ctx.owners, ctx.total = m.norms, m.owners, m.total
        return m

    def _register(
        self, ctx: StepContext, m: Measurement, level: Tensor, reduce: Callable[[Tensor], Tensor] | None
    ) -> bool:
        """Every value the host needs, registered by name in the step's read, and the flags: the core's,
        then the components', summed across ranks by ``reduce`` in one collective (in one stack with the
        watched values on one process). The step is skipped on the device when it can be; returns
        whether it is."""
        core = dict(zip(FLAGS, device_flags(m, m.loss_finite), strict=True))
        scale = m.loss_scale.to(m.zero.device).reshape(()).float() if m.loss_scale is not None else m.zero
        watch = [m.total.to(m.zero.device, torch.float32), scale, level]
        for c in self.components:
            raised = len(ctx._flags)
            c.register(ctx)
            ctx._owners.update(dict.fromkeys(list(ctx._flags)[raised:], c))  # who words each flag's skip
        own = {**(core if m.shared_flags is None else {}), **ctx._flags}  # what still needs the sum
        names, parts = list(own), [own[n].reshape(1) for n in own] + [v.reshape(-1) for v in ctx._reduced.values()]
        summed = reduce(torch.cat(parts)) if reduce is not None and parts else None
        if summed is not None:  # each rank's own flags, kept: a replay names the faulty rank
            ctx._local = own
            flags = {**core, **dict(zip(names, summed[: len(names)].unbind(), strict=True))}
            at = len(names)
            for name, value in ctx._reduced.items():
                ctx.put(name, summed[at : at + value.numel()])
                at += value.numel()
            ctx.read.put_each((*flags, *_WATCH), torch.cat([torch.stack(list(flags.values())), torch.stack(watch)]))
        else:
            flags = {**core, **ctx._flags}
            for name, value in ctx._reduced.items():
                ctx.put(name, value)
            ctx.read.put_each((*flags, *_WATCH), torch.stack([*flags.values(), *watch]))
        skip = flags["grad_bad"] + flags["loss_bad"]
        for name in ctx._skip_flags:
            skip = skip + flags[name]
        healthy = (skip + flags["amp_bad"]) == 0
        for c in self.components:
            c.flags_reduced(ctx, {**flags, "healthy": healthy})
        on_device = self.policy.on_device(ctx.optimizer, ctx.logging, self.clipping.needs_host or self._needs_host,
                                          m.loss_scale is not None)  # fmt: skip
        if on_device:  # a faulty step is skipped by the optimizer itself: no read needed now
            self.skipper.arm(ctx.optimizer, skip)
        else:
            self.skipper.disarm(ctx.optimizer)
        if ctx.logging:
            ctx.layer_ids, per_layer = layer_norms(m.norms, m.owners, ctx.layout, self.norm_type)
            ctx.put("layers", per_layer)
            if self.vanish_ratio is not None:
                ctx.put("weights", weight_norms(m.norms, m.owners, ctx.layout, self.norm_type))
        return on_device

    def _decide(self, ctx: StepContext, report: StepReport) -> None:
        """Act on the step's flags (skip, warn, raise, stop): the policy decides, the components settle."""
        read = ctx.read
        verdict = ctx.verdict = Verdict.of(read, tuple(ctx._skip_flags))
        ctx.report, total = report, read["total"]
        self.clipping.observe(total, verdict.finite, read[CLIP_LEVEL])

        def fault() -> Fault:
            params = () if ctx.deferred else ctx.layout.params  # a deferred step's gradients belong to a later one
            assert ctx.norms is not None and ctx.total is not None
            return Fault(ctx.number, report.total_norm, ctx.norms, ctx.owners, ctx.layout, params, ctx.optimizer_idx)

        def skip_event(flag: str) -> GradEvent | None:  # worded by the component that raised the flag
            owner = ctx._owners.get(flag)
            return owner.skip_event(ctx, flag) if owner is not None else None

        report.event, report.skipped = self.policy.decide(verdict, total, fault, ctx.record, skip_event)
        report.amp_overflow, report.nonfinite = verdict.amp_bad, verdict.nonfinite
        report.should_stop = verdict.nonfinite and self.on_nonfinite == "stop"
        if report.skipped:
            ctx.skip_reason = ctx._skip_flags[verdict.skips[0]] if verdict.skipped_by_flag else "nonfinite"
        for c in self.components:
            c.settle(ctx)

    def _report(self, ctx: StepContext, late: HostRead | None) -> None:
        """Every metric of a logging step, from its host values; the components add theirs."""
        read, report, p = ctx.read, ctx.report, METRIC_PREFIX
        assert report is not None
        total = read["total"]
        metrics = {f"{p}total_norm": total}
        metrics.update(self.clipping.metrics(late if late is not None else read, total, self.steps, p))
        report.layer_norms, per_layer = layer_metrics(ctx.layout.layer_names, ctx.layer_ids, read.vector("layers"))
        metrics.update(per_layer)
        metrics[f"{p}skipped_steps"] = float(self.policy.skipped_steps)
        metrics[f"{p}nonfinite_steps"] = float(self.policy.nonfinite_steps)
        report.metrics = metrics
        report.layer_order = self.layers.forward_names(ctx.layout)
        report.layout = ctx.layout
        for c in self.components:
            c.report(ctx)

    def _detect(self, ctx: StepContext) -> None:
        """Run every detector on the step's host values; record what they find."""
        read, layout, report, verdict = ctx.read, ctx.layout, ctx.report, ctx.verdict
        assert report is not None and verdict is not None
        finite = verdict.finite and not verdict.skipped_by_flag  # a step skipped on a flag feeds no statistics
        norms, owners = ctx.norms, ctx.owners
        obs = Observation(
            ctx.number, ctx.optimizer_idx, read["total"], finite, verdict.nonfinite, read["loss_scale"],
            logged=ctx.logging, layer_norms=report.layer_norms,
            layers_now=lambda: layer_norms_now(norms, owners, layout, self.norm_type),  # type: ignore[arg-type]
        )  # fmt: skip
        if ctx.logging:
            if "weights" in read:
                names = (layout.layer_names[i] for i in ctx.layer_ids)
                obs.weight_norms = dict(zip(names, read.vector("weights"), strict=True))
            obs.unused = [] if verdict.nonfinite else layout.unused(ctx.layer_ids)
        for c in self.components:
            c.observe(ctx, obs)
        for detector in [*self.detectors, *(d for c in self.components for d in c.detectors())]:
            for event in detector.detect(obs):
                ctx.record(event)
                if detector.headline:
                    report.event = event

    def _settle_deferred(self, ctx: StepContext) -> StepReport:
        report = StepReport(ctx.number, ctx.total.float() if ctx.total is not None else torch.zeros(()))
        self._decide(ctx, report)
        self._detect(ctx)
        for c in self.components:
            c.end_step(ctx)
        return report

    def _defer(self, ctx: StepContext) -> StepReport:
        """Keep the step's read for later: nothing on the host depends on it now (no sync)."""
        ctx.deferred, ctx.measurement = True, None  # no gradient kept alive
        self._pending.append(ctx)
        self._advance()
        if len(self._pending) >= _PENDING_LIMIT:  # bound the memory of a run that never logs
            self.flush()
        return StepReport(ctx.number, ctx.total if ctx.total is not None else torch.zeros(()), deferred=True)

    def _skip_unmeasured(self, ctx: StepContext) -> StepReport:
        """Skip a step without measuring it (a component's gate: a batch after a rollback, or on the
        resumed skip list)."""
        self.skipper.disarm(ctx.optimizer)
        self.policy.skip_unmeasured(ctx.layout.params)
        self._loss_finite = None
        self._advance()
        return StepReport(ctx.number, torch.zeros(()), skipped=True)

    def _skip_settled(self, ctx: StepContext, cause: str, rolled_back: bool) -> None:
        """Skip a settled step after its decision (a component's, e.g. a rollback): every optimizer's
        gradients to None, counted once by the policy."""
        report = ctx.report
        assert report is not None
        self.skipper.disarm(ctx.optimizer)
        optimizers = [ctx.optimizer, *(o for o in self._optimizers if o is not ctx.optimizer)]
        self.policy.skip_settled([p for opt in optimizers for g in opt.param_groups for p in g["params"]],
                                 already=report.skipped)  # fmt: skip
        report.skipped = True
        report.rolled_back = report.rolled_back or rolled_back

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

    def _record_in(self, ctx: StepContext | None, event: GradEvent) -> GradEvent:
        """Record an event of this step: each component may enrich it first (the replay's verdict)."""
        for c in self.components:
            event = c.enrich(ctx, event)
        return self._record(event)

    def record(self, event: GradEvent) -> GradEvent:
        """Record an event outside a step (an adapter's: a deferred checkpoint): the components may
        enrich it, then it is kept and emitted as the step's events are."""
        return self._record_in(None, event)

    def restore_points(self) -> list[int]:
        """The steps the run may still be restored to (the rollback's snapshots), oldest first."""
        return sorted({step for c in self.components for step in c.restore_points()})

    def save_vetoes(self) -> list[str]:
        """Why the run's state should not be saved now, if any reason: a streak of skipped steps (one
        skip is the guard at work, as a GradScaler's overflow is), or a component's (a rollback pending,
        a non-finite loss, a spike in progress). Deferred steps are settled first (one host read when
        any is pending): every rank gives the same answer."""
        self.flush()
        skips = self.policy.consecutive_skips
        mine = [f"the last {skips} steps were skipped"] if skips >= 2 else []
        return mine + [why for c in self.components if (why := c.checkpoint_veto()) is not None]

    def _record(self, event: GradEvent) -> GradEvent:
        self._events.append(event)
        self.kind_counts[event.kind] = self.kind_counts.get(event.kind, 0) + 1
        self.emit(event)
        return event

    def _on_skip_limit(self, cause: str) -> bool:
        return any(c.on_skip_limit(cause) for c in self.components)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if alerts.is_rank_zero():
                alerts.warn(message)


def _has_dtensor(model: nn.Module) -> bool:
    from lightning_gradguard.primitives.norms import dtensor_type

    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())
