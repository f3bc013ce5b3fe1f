"""The framework-free guard: measure, detect, clip and skip, for one optimizer step at a time.

:class:`GuardCore` imports torch only. The Lightning callback
(:class:`lightning_gradguard.GradGuard`) is a thin adapter over it, and a plain PyTorch loop uses it
directly::

    guard = GuardCore(model, clip=NormClip(max_norm=1.0))
    for batch in loader:
        optimizer.zero_grad()
        loss = model(batch)
        guard.observe_loss(loss)          # optional: lets a NaN loss be named as the origin
        loss.backward()
        report = guard.step(optimizer)    # measure, detect, clip, skip if needed
        if not report.skipped:
            optimizer.step()

Under fp16 AMP call ``scaler.unscale_(optimizer)`` first, then ``guard.step(optimizer,
scaler=scaler)``, then ``scaler.step(optimizer)``.

Cost: every step, one ``_foreach_norm`` per (device, dtype) group, a few device reductions, the
clip, and exactly one host sync (reading the non-finite flags, which the skip decision needs).
On logging steps the per-layer norms are one extra scatter on the device and ride along in that same
sync. Only a faulty step pays more (to list its non-finite layers).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard import alerts
from lightning_gradguard._validate import check_choice, check_int, check_number
from lightning_gradguard.clip import ClipContext, ClipOutcome, Clipper
from lightning_gradguard.detect import LayerWatch, SpikeDetector, describe_nonfinite, nonfinite_tensors, origin_of
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.layers import LayerMap
from lightning_gradguard.measure import (
    combine_norms,
    global_norms,
    grad_norms,
    group_by_device_and_dtype,
    group_norms,
)
from lightning_gradguard.timesteps import TimestepTracker, summarize_profile

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None  # type: ignore[assignment,misc]

__all__ = ["METRIC_PREFIX", "GuardCore", "OnNonFinite", "StepReport"]

OnNonFinite = Literal["skip", "warn", "raise", "stop"]
GroupBy = Literal["layer", "parameter"]
METRIC_PREFIX = "gradguard/"
_POLICIES = ("skip", "warn", "raise", "stop")


@dataclass
class StepReport:
    """What :meth:`GuardCore.step` found and did on one optimizer step.

    Attributes:
        step: the step number the report belongs to.
        total_norm: the total gradient norm before clipping (0-d device tensor; no sync to build).
        skipped: the guard set every gradient of the optimizer to None: do not call
            ``optimizer.step()`` (calling it anyway is harmless: torch optimizers skip parameters
            whose grad is None).
        nonfinite: the step had a non-finite gradient or loss (not counting fp16 overflows that a
            GradScaler handles).
        amp_overflow: a GradScaler found Inf/NaN and will skip this step itself.
        should_stop: the policy asks the training loop to stop.
        event: the event recorded for this step, if any.
        logged: whether this was a logging step.
        metrics: on logging steps, every metric as ``{key: float}``; empty otherwise.
        layer_norms: on logging steps, the norm of each layer before clipping.
        timesteps: on logging steps, each tracked sequence's per-timestep norms (1-D CPU tensors).
        deferred: under ``on_nonfinite="warn"`` a non-logging step is not read on the host at all
            (no sync): its flags and events are settled at the next logging step or
            :meth:`GuardCore.flush`; ``nonfinite`` and ``event`` are then left unset here.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> report = GuardCore(log_every_n_steps=1).step(torch.optim.SGD([p], lr=0.1))
        >>> report.skipped, report.logged, report.metrics["gradguard/total_norm"]
        (False, True, 5.0)
    """

    step: int
    total_norm: Tensor
    skipped: bool = False
    nonfinite: bool = False
    amp_overflow: bool = False
    should_stop: bool = False
    event: GradEvent | None = None
    logged: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    layer_norms: dict[str, float] = field(default_factory=dict)
    timesteps: dict[str, Tensor] = field(default_factory=dict)
    deferred: bool = False


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
        emit: called with each event instead of the built-in :class:`~lightning_gradguard.alerts.AlertRouter`.
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
            that raises is logged once and never stops training.

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
        alert_handlers: Sequence[Callable[[GradEvent], Any]] = (),
    ) -> None:
        if clip is not None and not isinstance(clip, Clipper):
            raise TypeError(
                f"Expected `clip` to be a Clipper such as NormClip(max_norm=1.0), or None, but got {clip!r}."
            )
        self.clip = clip
        if not isinstance(sharded, bool):
            raise TypeError(f"Expected `sharded` to be a bool, but got {sharded!r}.")
        self.sharded = sharded
        self.process_group = process_group
        self.norm_type = float(check_number("norm_type", norm_type, minimum=0.0, allow_inf=True))  # type: ignore[arg-type]
        self.on_nonfinite: OnNonFinite = check_choice("on_nonfinite", on_nonfinite, _POLICIES)  # type: ignore[assignment]
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
        if isinstance(alert_handlers, (str, bytes)) or not isinstance(alert_handlers, Sequence):
            raise TypeError(f"Expected `alert_handlers` to be a list of callables, but got {alert_handlers!r}.")
        for h in alert_handlers:
            if not callable(h):
                raise ValueError(f"Expected every entry of `alert_handlers` to be callable, but got {h!r}.")
        self.alerts = alerts.AlertRouter(self.alert_every, alert_handlers)
        self.emit = emit if emit is not None else self.alerts
        self.spike = SpikeDetector(self.spike_warmup) if self.spike_zscore is not None else None
        self.watchlist = LayerWatch(self.vanish_threshold, self.vanish_ratio, self.vanish_patience)
        self.kind_counts: dict[str, int] = {}
        self.layers = LayerMap(self.group_by)
        if not isinstance(track_timesteps, bool) and (
            isinstance(track_timesteps, str)
            or not isinstance(track_timesteps, Sequence)
            or not all(isinstance(n, str) for n in track_timesteps)
        ):
            raise TypeError(
                f"Expected `track_timesteps` to be a bool or a list of module names, but got {track_timesteps!r}."
            )
        ratio = check_number("timestep_vanish_ratio", timestep_vanish_ratio, minimum=0.0)
        self.timestep_vanish_ratio = float(ratio) if ratio is not None else 1e-4
        if self.timestep_vanish_ratio >= 1:
            raise ValueError(
                f"Expected `timestep_vanish_ratio` to be a number in (0, 1), but got {timestep_vanish_ratio!r}."
            )
        self.timestep_history = int(check_int("timestep_history", timestep_history, minimum=1))  # type: ignore[arg-type]
        self.timesteps: TimestepTracker | None = None
        if track_timesteps is not False:
            self.timesteps = TimestepTracker(self.norm_type, True if track_timesteps is True else list(track_timesteps))
        self.timestep_norms: dict[str, Tensor] = {}
        self.timestep_summaries: dict[str, dict[str, float]] = {}
        self.timestep_heat: dict[str, deque[tuple[int, Tensor]]] = {}
        self._rate: dict[tuple[str, str], list[int]] = {}
        self._events: deque[GradEvent] = deque(maxlen=self.max_events)
        self._pending: list[tuple[int, Tensor, Tensor, Sequence[int], Any, int]] = []
        self._loss_finite: Tensor | None = None
        self._clipped: Tensor | None = None  # device counter of steps the clipper changed
        self._log_mark = (0, 0)  # (steps, clipped steps) at the last logging step
        self._max_norm_host = 0.0  # the largest finite total norm (host: read with each step's flags)
        self._clipped_host = 0  # steps the (non-deferred) clipper changed
        self._warned: set[str] = set()
        self.steps = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.consecutive_skips = 0
        self.amp_overflow_steps = 0
        self.origins: dict[str, int] = {}
        if model is not None:
            self.watch(model)

    # ------------------------------------------------------------------ setup
    def watch(self, model: nn.Module) -> None:
        """Name ``model``'s parameters by layer, record its forward order on the next forward, and
        attach the (dormant) per-timestep hooks to its recurrent modules."""
        self.layers.watch(model)
        if self.timesteps is not None:
            tracked = self.timesteps.watch(model)
            missing = sorted((self.timesteps.only or set()) - set(tracked))
            if missing:
                self._warn_once(
                    "ts-missing",
                    f"GradGuard: track_timesteps names {missing}, which match no recurrent module of the model.",
                )

    def unwatch(self) -> None:
        """Remove every hook the guard registered on the model."""
        self.layers.unwatch()
        if self.timesteps is not None:
            self.timesteps.unwatch()

    def begin_step(self, step: int | None = None, log: bool | None = None) -> None:
        """Call before the forward pass(es) of an optimizer step, to arm per-timestep tracking.

        Only on logging steps are the timestep hooks armed; on other steps this costs one branch.
        Micro-batches of one optimizer step may call it each; their profiles combine.
        """
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

    @property
    def events(self) -> list[GradEvent]:
        """The recorded events, oldest first (at most ``max_events``)."""
        return list(self._events)

    def observe_loss(self, loss: Tensor) -> None:
        """Note whether ``loss`` is finite (no host sync), so a non-finite loss is named the origin.

        Call it before each backward; micro-batches of one optimizer step combine.
        """
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    # ------------------------------------------------------------------- step
    def is_logging_step(self, step: int) -> bool:
        """Whether ``step`` is a logging step under ``log_every_n_steps``."""
        n = self.log_every_n_steps
        return n is not None and (step + 1) % n == 0

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int | None = None,
        log: bool | None = None,
        scaler: torch.amp.GradScaler | None = None,
        optimizer_idx: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> StepReport:
        """Measure, detect, clip and (per the policy) skip one optimizer step.

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

        Returns:
            A :class:`StepReport`.

        Raises:
            NonFiniteGradientError: under ``on_nonfinite="raise"`` on a non-finite step, or when
                ``max_consecutive_skips`` steps in a row were skipped.
        """
        step = self.steps if step is None else step
        is_log = self.is_logging_step(step) if log is None else log
        layout = self.layers.layout(optimizer)
        params = layout.params
        grads, owners, shard_flags = self._collect(layout)
        if not grads:
            self._warn_once(
                "empty",
                "GradGuard: the optimizer has no parameter with a gradient this step; nothing to measure.",
            )
            self.steps += 1
            self.layers.freeze_order()
            return StepReport(step, torch.zeros(()))
        device = grads[0].device
        inv_scale, amp_found = self._amp_state(optimizer, scaler, device)

        if layout.single_group is None:  # learned once: gradients keep their device and dtype
            layout.single_group = len(group_by_device_and_dtype(grads)) == 1
        single = bool(layout.single_group)
        norms = grad_norms(grads, self.norm_type, single)
        sharded = self.sharded if shard_flags is None else any(shard_flags)
        if sharded:
            mask = None if shard_flags is None or all(shard_flags) else torch.tensor(shard_flags, device=norms.device)
            norms = global_norms(norms, self.norm_type, mask, self.process_group)
        if inv_scale is not None:
            norms = norms * inv_scale
        total = combine_norms(norms, self.norm_type)
        finite = torch.isfinite(total)
        if inv_scale is not None:  # scaled grads: an overflow is the scaler's business
            amp_found = ~finite
        zero = torch.zeros((), device=device)  # made on the device: a CPU constant would be a copy (a sync)
        bad = [(~finite).float(), zero, zero]
        if self._loss_finite is not None:
            bad[1] = (~self._loss_finite).to(device).float()
        if amp_found is not None:
            bad[2] = amp_found.to(device).float()
        flags = torch.stack(bad)
        if reduce is not None:
            flags = reduce(flags)
        scale_now = scaler._scale if scaler is not None and scaler.is_enabled() and scaler._scale is not None else None

        outcome: ClipOutcome | None = None
        ctx: ClipContext | None = None
        if self.clip is not None:
            sub_params, sub_layers, sub_names = layout.subset(owners)
            ctx = ClipContext(
                grads,
                norms,
                total,
                finite,
                self.norm_type,
                is_log,
                params=sub_params,
                layer_of=sub_layers,
                layer_names=layout.layer_names,
                param_names=sub_names,
                inv_scale=inv_scale,
                sharded=sharded,
                single_group=single,
                host_observed=self.clip.needs_host_stats,
                _index={"layer": layout.index(owners, norms.device)[0]},
            )
        clipped_bit = zero
        if self.clip is not None and not self.clip.deferred:
            assert ctx is not None
            outcome = self.clip.clip_(ctx)
            clipped_bit = (outcome.clipped if outcome.clipped is not None else outcome.coef < 1).to(device).float()
        # Read on the host with the flags: the statistics (spike z-score, largest norm, clipped
        # steps) are then plain Python arithmetic, with no kernels of their own.
        watch = torch.stack(
            [
                total.to(device, torch.float32),
                scale_now.to(device).reshape(()).float() if scale_now is not None else zero,
                clipped_bit,
            ]
        )

        layer_ids: list[int] = []
        packed = [flags, watch]
        if is_log:
            index, layer_ids, layer_sel = layout.index(owners, norms.device)
            per_layer = group_norms(norms, index, len(layout.layer_names), self.norm_type).index_select(0, layer_sel)
            extras = [total]
            if outcome is not None:
                extras += self._clip_extras(outcome, total)
            packed += [torch.stack([e.to(total.device, total.dtype) for e in extras]), per_layer]
            if self.vanish_ratio is not None:
                weights = [params[i].detach() for i in owners]
                w_norms = grad_norms(weights, self.norm_type).to(norms.device)
                w_layers = group_norms(w_norms, index, len(layout.layer_names), self.norm_type)
                packed.append(w_layers.index_select(0, layer_sel))
        profiles: dict[str, Tensor] = {}
        if self.timesteps is not None:
            if is_log and self.timesteps.armed:
                scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
                profiles = self.timesteps.collect(scale)
                packed += list(profiles.values())
            elif self.timesteps.armed:
                self.timesteps.disarm()
        head = torch.cat([flags.float(), watch.to(flags.device)])
        needs_host = self.clip is not None and (self.clip.deferred or self.clip.needs_host_stats)
        if self.on_nonfinite == "warn" and not is_log and not needs_host:
            # Nothing on the host depends on this step's flags (no skip): read them later, with the
            # next logging step's sync (or flush()), so that a non-logging step never blocks.
            self._pending.append((step, head, norms, owners, layout, optimizer_idx))
            self.steps += 1
            self.layers.freeze_order()
            self._loss_finite = None
            if len(self._pending) >= 256:  # bound the memory of a run that never logs
                self.flush()
            return StepReport(step, total, deferred=True)
        pending, self._pending = self._pending, []
        packed = [head, *packed[2:], *(p[1] for p in pending)]
        # The one deliberate host sync of the step: the skip decision needs the flags.
        values = torch.cat([t.reshape(-1).to(flags.device, torch.float32) for t in packed]).tolist()
        n_pending = len(pending) * 6
        late_vals = values[len(values) - n_pending :] if n_pending else []
        values = values[: len(values) - n_pending] if n_pending else values
        for k, (p_step, p_head, p_norms, p_owners, p_layout, p_idx) in enumerate(pending):
            late = late_vals[6 * k : 6 * k + 6]
            self._settle(StepReport(p_step, p_head[3]), late, p_layout, [], p_norms, p_owners, p_idx)
        profile_len = sum(int(t.numel()) for t in profiles.values())
        logged = values[6 : len(values) - profile_len]
        weight_vals: list[float] = []
        if is_log and self.vanish_ratio is not None:
            weight_vals = logged[len(logged) - len(layer_ids) :]
            logged = logged[: len(logged) - len(layer_ids)]
        profile_vals = values[len(values) - profile_len :]

        self.steps += 1
        self.layers.freeze_order()
        report = StepReport(step, total, logged=is_log)
        finite_step = self._settle(report, values[:6], layout, params, norms, owners, optimizer_idx)
        if finite_step and self.clip is not None and self.clip.deferred:
            assert ctx is not None
            late_clip = self.clip.clip_(ctx)
            self._count_clipped(late_clip)  # a device counter, read with the next logging step
            if is_log:  # a deferred clipper's clipped norm costs one more read (documented)
                logged[1:1] = torch.stack([e.to(total) for e in self._clip_extras(late_clip, total)]).tolist()
        if is_log and self.clip is not None and len(logged) == 1 + len(layer_ids):
            # clipper not applied on this (non-finite) step
            logged[1:1] = [logged[0], 1.0, math.nan, 0.0]
        self._loss_finite = None
        if is_log:
            self._fill_metrics(report, logged, layout.layer_names, layer_ids)
            self._timestep_metrics(report, profiles, profile_vals)
            if not report.nonfinite:
                self._watch_layers(report, layout, params, owners, layer_ids, weight_vals, optimizer_idx)
        return report

    def flush(self) -> None:
        """Read and report the flags of steps deferred under ``on_nonfinite="warn"`` (one host sync).

        Called by the next logging step, :meth:`summary`, :meth:`state_dict` and the Lightning
        adapter at the end of training; call it yourself before reading counters mid-run.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = torch.cat([p[1].reshape(-1).float().to(pending[0][1].device) for p in pending]).tolist()
        for k, (p_step, head, p_norms, p_owners, p_layout, p_idx) in enumerate(pending):
            self._settle(StepReport(p_step, head[3]), values[6 * k : 6 * k + 6], p_layout, [], p_norms, p_owners, p_idx)

    def _settle(
        self,
        report: StepReport,
        head: Sequence[float],
        layout: Any,
        params: Sequence[Tensor],
        norms: Tensor,
        owners: Sequence[int],
        optimizer_idx: int,
    ) -> bool:
        """Act on one step's host values [grad bad, loss bad, amp overflow, total, loss scale, clipped].

        Returns whether the step was finite (no overflow, no non-finite gradient or loss).
        """
        grad_bad, loss_bad, amp_bad = (v > 0 for v in head[:3])
        total, scale, clipped = head[3:6]
        step = report.step
        finite = False
        self._clipped_host += int(clipped > 0)
        if self.clip is not None and self.clip.needs_host_stats:
            self.clip.observe(total, not (grad_bad or loss_bad or amp_bad))
        if amp_bad:
            report.amp_overflow = True
            self.amp_overflow_steps += 1
            report.event = self._record(
                GradEvent(
                    "amp_overflow",
                    step=step,
                    value=total,
                    message=f"GradGuard: fp16 overflow at step {step}; the GradScaler skips this step "
                    "and lowers its scale.",
                    optimizer_idx=optimizer_idx,
                    action="none",
                )
            )
        elif grad_bad or loss_bad:
            self._handle_nonfinite(report, params, [], owners, layout, norms, loss_bad, optimizer_idx)
        else:
            finite = True
            self.consecutive_skips = 0
            if math.isfinite(total):
                self._max_norm_host = max(self._max_norm_host, total)
            z = self.spike.score(total) if self.spike is not None else math.nan
            self._detect(report, total, z, layout, norms, owners, optimizer_idx)
        if scale > 0 and scale < self.min_loss_scale:  # 0: no scaler
            self._record(
                GradEvent(
                    "loss_scale_collapse",
                    step=step,
                    value=scale,
                    message=f"GradGuard: the fp16 loss scale fell to {scale:g} at step {step} (min_loss_scale="
                    f"{self.min_loss_scale:g}): overflows keep recurring. Check for an fp16-unsafe op, lower the "
                    "learning rate, or train in bf16.",
                    optimizer_idx=optimizer_idx,
                )
            )
        return finite

    # ------------------------------------------------------------- detection
    def _detect(
        self,
        report: StepReport,
        total: float,
        z: float,
        layout: Any,
        norms: Tensor,
        owners: Sequence[int],
        optimizer_idx: int,
    ) -> None:
        """Exploding and spike events of a finite step (host values from the step's one sync)."""
        step = report.step
        if self.explode_threshold is not None and total > self.explode_threshold:
            report.event = self._record(
                GradEvent(
                    "exploding",
                    step=step,
                    value=total,
                    message=f"GradGuard: exploding gradient at step {step}: total norm {total:.4g} > "
                    f"explode_threshold {self.explode_threshold:g}. Consider NormClip(max_norm=...) or ZClip().",
                    optimizer_idx=optimizer_idx,
                )
            )
        if self.spike_zscore is not None and z == z and z > self.spike_zscore:
            # A rare step: pay one more read for the per-layer norms that say where the spike is.
            index = torch.tensor([layout.param_layer[i] for i in owners], device=norms.device)
            per_layer = group_norms(norms, index, len(layout.layer_names), self.norm_type).tolist()
            present = set(index.tolist())
            layer_norms = {layout.layer_names[i]: per_layer[i] for i in present}
            top = self.watchlist.grew_most(layer_norms)
            report.event = self._record(
                GradEvent(
                    "spike",
                    step=step,
                    layers=tuple(top),
                    origin=top[0] if top else None,
                    value=z,
                    message=f"GradGuard: gradient spike at step {step}: total norm {total:.4g} is {z:.1f} standard "
                    f"deviations above its recent log-norm; grew most: {', '.join(top)}.",
                    optimizer_idx=optimizer_idx,
                    extra={"total_norm": total},
                )
            )

    def _watch_layers(
        self,
        report: StepReport,
        layout: Any,
        params: Sequence[Tensor],
        owners: Sequence[int],
        layer_ids: Sequence[int],
        weight_vals: Sequence[float],
        optimizer_idx: int,
    ) -> None:
        """Vanishing, dead and unused layers, on logging steps (per-layer norms already on the host)."""
        names = layout.layer_names
        weights = {names[i]: w for i, w in zip(layer_ids, weight_vals, strict=False)}
        with_grad = set(layer_ids)
        unused = (
            sorted(
                {
                    names[layout.param_layer[i]]
                    for i, p in enumerate(params)
                    if p.requires_grad and layout.param_layer[i] not in with_grad
                }
            )
            if len(with_grad) < len(names)
            else []
        )
        vanishing, dead, fresh_unused = self.watchlist.update(report.layer_norms, weights, unused)
        step = report.step
        if vanishing:
            rule = f"below vanish_threshold={self.vanish_threshold:g}"
            if self.vanish_ratio is not None:
                rule += f" or ‖g‖/‖w‖ < vanish_ratio={self.vanish_ratio:g}"
            self._record(
                GradEvent(
                    "vanishing",
                    step=step,
                    layers=tuple(vanishing),
                    value=min(report.layer_norms[n] for n in vanishing),
                    message=f"GradGuard: vanishing gradient at step {step} in {', '.join(vanishing)}: {rule} for "
                    f"{self.vanish_patience} logging steps. Check initialisation and normalisation; for RNNs a "
                    "gated cell (LSTM/GRU).",
                    optimizer_idx=optimizer_idx,
                )
            )
        if dead:
            self._record(
                GradEvent(
                    "dead",
                    step=step,
                    layers=tuple(dead),
                    value=0.0,
                    message=f"GradGuard: dead layers at step {step}: {', '.join(dead)} got exactly zero gradients "
                    "(dead ReLUs, a zero multiplier, or a detached path). Check the wiring.",
                    optimizer_idx=optimizer_idx,
                )
            )
        if fresh_unused:
            self._record(
                GradEvent(
                    "unused",
                    step=step,
                    layers=tuple(fresh_unused),
                    message=f"GradGuard: unused layers at step {step}: {', '.join(fresh_unused)} require grad but got "
                    "no gradient. Freeze them (requires_grad=False) or check the forward pass.",
                    optimizer_idx=optimizer_idx,
                )
            )

    def _collect(self, layout: Any) -> tuple[list[Tensor], list[int], list[bool] | None]:
        """The dense local gradients of the layout's parameters, their indices and shard flags.

        Fast path (the usual case, learned on the first step): every gradient is a plain dense
        tensor; one list comprehension, as in ``clip_grad_norm_``, and the shard flags are None
        (all equal to ``self.sharded``). Otherwise each gradient is looked at: ``DTensor`` gradients
        are measured through their local shard, sparse ones are skipped with a one-time warning.
        """
        params = layout.params
        if layout.plain:
            raw = [p.grad for p in params]
            grads = [g for g in raw if g is not None]
            if len(grads) == len(params):
                return grads, layout.all_owners, None
            return grads, [i for i, g in enumerate(raw) if g is not None], None
        grads, owners, flags = [], [], []
        special = False
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            if _DTensor is not None and isinstance(g, _DTensor):
                special = True
                shard = any(pl.is_shard() or pl.is_partial() for pl in g.placements)
                g = g.to_local()
            else:
                shard = self.sharded
            if g.is_sparse:
                special = True
                self._warn_once("sparse", "GradGuard: sparse gradients are not measured or clipped; they are skipped.")
                continue
            grads.append(g)
            owners.append(i)
            flags.append(shard)
        if grads and layout.plain is None:
            layout.plain = not special
        return grads, owners, flags

    def _timestep_metrics(self, report: StepReport, profiles: dict[str, Tensor], values: list[float]) -> None:
        offset = 0
        for name, dev in profiles.items():
            n = int(dev.numel())
            profile = torch.tensor(values[offset : offset + n], dtype=torch.float32)
            offset += n
            self.timestep_norms[name] = profile
            report.timesteps[name] = profile
            heat = self.timestep_heat.setdefault(name, deque(maxlen=self.timestep_history))
            heat.append((report.step, profile))
            summary = summarize_profile(profile)
            self.timestep_summaries[name] = summary
            for key, value in summary.items():
                report.metrics[f"{METRIC_PREFIX}timestep/{name}/{key}"] = value
            ratio = summary["first_last_ratio"]
            if ratio < self.timestep_vanish_ratio:
                self._rate_limited(report.step, "vanishing_in_time", name, ratio, "vanishes")
            elif ratio > 1.0 / self.timestep_vanish_ratio:
                self._rate_limited(report.step, "exploding_in_time", name, ratio, "explodes")

    def _rate_limited(self, step: int, kind: str, name: str, ratio: float, verb: str, every: int = 100) -> None:
        """One event per (kind, name) per ``every`` optimizer steps; the rest are counted."""
        last, suppressed = self._rate.get((kind, name), [-(10**12), 0])
        if step - last < every:
            self._rate[(kind, name)] = [last, suppressed + 1]
            return
        self._rate[(kind, name)] = [step, 0]
        more = f" ({suppressed} more times since step {last})" if suppressed else ""
        threshold = self.timestep_vanish_ratio
        self._record(
            GradEvent(
                kind,  # type: ignore[arg-type]
                step=step,
                layers=(name,),
                origin=name,
                value=ratio,
                message=f"GradGuard: the gradient through time {verb} in '{name}' at step {step}: "
                f"first/last timestep norm ratio {ratio:.3g} (threshold {threshold:g}){more}.",
                action="none",
            )
        )

    # --------------------------------------------------------------- helpers
    def _amp_state(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """(1/scale if the gradients are still scaled, the scaler's found-inf flag if it unscaled)."""
        if scaler is None or not scaler.is_enabled():
            return None, None
        from torch.amp.grad_scaler import OptState

        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            found = state["found_inf_per_device"]
            flag = sum((v.to(device).reshape(()) for v in found.values()), torch.zeros((), device=device))
            return None, flag
        if self.clip is not None and self.clip.deferred:
            raise GradGuardError(
                f"GradGuard: {self.clip!r} cannot clip gradients that are still scaled by the GradScaler "
                "(a fused optimizer unscales inside step()). Use NormClip, or call scaler.unscale_(optimizer) "
                "before the guard."
            )
        scale = scaler._scale
        assert scale is not None
        return scale.double().reciprocal().float().to(device), None

    def _clip_extras(self, outcome: ClipOutcome, total: Tensor) -> list[Tensor]:
        """[clipped total, coef, threshold, clipped units] (device tensors)."""
        nan = torch.full_like(total, math.nan)
        return [
            outcome.clipped_total if outcome.clipped_total is not None else total,
            outcome.coef,
            outcome.threshold if outcome.threshold is not None else nan,
            outcome.clipped_units if outcome.clipped_units is not None else nan,
        ]

    def _count_clipped(self, outcome: ClipOutcome) -> None:
        """Deferred clippers only (applied after the sync): count on the device, read when needed."""
        hit = outcome.clipped if outcome.clipped is not None else outcome.coef < 1
        bit = hit.to(torch.int64)
        # Keep the counter on the gradients' device: adding a device bit to a CPU counter (as restored
        # from a checkpoint) would be a device-to-host copy, i.e. a host sync, on every step.
        self._clipped = bit if self._clipped is None else self._clipped.to(bit.device) + bit

    def _handle_nonfinite(
        self,
        report: StepReport,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        owners: Sequence[int],
        layout: Any,
        norms: Tensor,
        loss_bad: bool,
        optimizer_idx: int,
    ) -> None:
        report.nonfinite = True
        self.nonfinite_steps += 1
        bad_layers = {layout.param_layer[owners[i]] for i in nonfinite_tensors(norms)}
        names = [layout.layer_names[i] for i in self.layers.ordered(layout, bad_layers)]
        origin = origin_of(names, loss_bad)
        # The origin rests on the forward order recorded on the first pass. A layer that did not run
        # then (a conditional branch) has no known place in it: say that the origin is uncertain.
        unplaced = [layout.layer_names[i] for i in bad_layers if layout.layer_seen and not layout.layer_seen[i]]
        certain = loss_bad or not unplaced
        policy = self.on_nonfinite
        action = {"skip": "skipped", "stop": "stopped", "raise": "raised", "warn": "warned"}[policy]
        if policy in ("skip", "stop"):
            for p in params:
                p.grad = None
            report.skipped = True
            self.skipped_steps += 1
            self.consecutive_skips += 1
        report.should_stop = policy == "stop"
        total = float(report.total_norm) if report.total_norm.numel() else math.nan
        event = GradEvent(
            "nonfinite",
            step=report.step,
            layers=tuple(names),
            origin=origin,
            value=total,
            message=describe_nonfinite(report.step, names, origin, total, action, optimizer_idx)
            + ("" if certain else f" (Origin uncertain: {', '.join(sorted(unplaced))} did not run in the recorded "
               "forward pass, so their place in the order is unknown.)"),
            optimizer_idx=optimizer_idx,
            action=action,
            extra={"origin_certain": certain},
        )
        key = origin or "unknown"
        self.origins[key] = self.origins.get(key, 0) + 1
        report.event = self._record(event)
        if policy == "raise":
            raise NonFiniteGradientError(event.message, event)
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteGradientError(
                f"GradGuard: {self.consecutive_skips} consecutive optimizer steps were skipped for non-finite "
                f"gradients (max_consecutive_skips={self.max_consecutive_skips}); the run is not recovering. "
                f"Last: {event.message}",
                event,
            )

    def _record(self, event: GradEvent) -> GradEvent:
        self._events.append(event)
        self.kind_counts[event.kind] = self.kind_counts.get(event.kind, 0) + 1
        self.emit(event)
        return event

    def _fill_metrics(
        self, report: StepReport, logged: list[float], layer_names: list[str], layer_ids: list[int]
    ) -> None:
        p = METRIC_PREFIX
        metrics = {f"{p}total_norm": logged[0]}
        rest = logged[1:]
        if self.clip is not None:
            clipped_total, coef, threshold, units = rest[:4]
            rest = rest[4:]
            count = self.clipped_steps
            metrics[f"{p}total_norm_clipped"], metrics[f"{p}clip_coef"] = clipped_total, coef
            if not math.isnan(threshold):
                metrics[f"{p}clip_threshold"] = threshold
            since_steps = self.steps - self._log_mark[0]
            metrics[f"{p}clipped_fraction"] = (count - self._log_mark[1]) / since_steps if since_steps else 0.0
            self._log_mark = (self.steps, int(count))
            if not math.isnan(units):
                metrics[f"{p}clipped_units"] = units
        else:
            metrics[f"{p}clip_coef"] = 1.0
        report.layer_norms = {layer_names[i]: v for i, v in zip(layer_ids, rest, strict=True)}
        for name, v in report.layer_norms.items():
            metrics[f"{p}layer/{name}"] = v
        metrics[f"{p}skipped_steps"] = float(self.skipped_steps)
        metrics[f"{p}nonfinite_steps"] = float(self.nonfinite_steps)
        report.metrics = metrics

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if alerts.is_rank_zero():
                warnings.warn(message, alerts.GradGuardWarning, stacklevel=3)

    # ------------------------------------------------------------- reporting
    @property
    def max_total_norm(self) -> float:
        """The largest finite total norm (before clipping) seen so far."""
        self.flush()
        return self._max_norm_host

    @property
    def clipped_steps(self) -> int:
        """How many steps the clipper changed (a deferred clipper's count costs one host read)."""
        self.flush()
        return self._clipped_host + (0 if self._clipped is None else int(self._clipped.item()))

    def summary(self) -> str:
        """A one-paragraph summary of the run so far.

        Example::

            >>> GuardCore().summary()
            'GradGuard summary: 0 optimizer steps guarded; no clipping configured; 0 skipped; 0 non-finite steps.'
        """
        self.flush()
        steps = self.steps
        if self.clip is None:
            clip = "no clipping configured"
        else:
            frac = self.clipped_steps / steps if steps else 0.0
            clip = f"{self.clipped_steps} clipped ({frac:.1%}) by {self.clip!r}"
        text = (
            f"GradGuard summary: {steps} optimizer steps guarded; {clip}; {self.skipped_steps} skipped; "
            f"{self.nonfinite_steps} non-finite steps"
        )
        if self.origins:
            ranked = sorted(self.origins.items(), key=lambda kv: -kv[1])
            text += " (origins: " + ", ".join(f"{k} x{v}" for k, v in ranked) + ")"
        if self.amp_overflow_steps:
            text += f"; {self.amp_overflow_steps} fp16 overflows handled by the GradScaler"
        others = {k: v for k, v in self.kind_counts.items() if k not in ("nonfinite", "amp_overflow")}
        if others:
            text += "; events: " + ", ".join(f"{k} x{v}" for k, v in sorted(others.items()))
        quiet = sum(self.alerts.suppressed.values())
        if quiet:
            text += f" ({quiet} repeated alerts were rate-limited; all are in guard.events)"
        return text + "."

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and clipper state, as plain values."""
        self.flush()
        return {
            "version": 1,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_skips": self.consecutive_skips,
            "amp_overflow_steps": self.amp_overflow_steps,
            "clipped_steps": self.clipped_steps,
            "max_total_norm": self._max_norm_host,
            "origins": dict(self.origins),
            "rate": {f"{k}|{n}": v for (k, n), v in self._rate.items()},
            "clip": self.clip.state_dict() if self.clip is not None else {},
            "spike": self.spike.state_dict() if self.spike is not None else {},
            "layers": self.watchlist.state_dict(),
            "alerts": self.alerts.state_dict(),
            "kinds": dict(self.kind_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys (older checkpoints) keep their defaults."""
        self.steps = int(state.get("steps", self.steps))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.amp_overflow_steps = int(state.get("amp_overflow_steps", 0))
        self._clipped = None
        self._clipped_host = int(state.get("clipped_steps", 0))
        self._max_norm_host = float(state.get("max_total_norm", 0.0))
        self._log_mark = (self.steps, int(state.get("clipped_steps", 0)))
        self.origins = {str(k): int(v) for k, v in dict(state.get("origins", {})).items()}
        self._rate = {tuple(k.split("|", 1)): list(v) for k, v in dict(state.get("rate", {})).items()}  # type: ignore[misc]
        if self.clip is not None and state.get("clip"):
            self.clip.load_state_dict(state["clip"])
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])
        self.watchlist.load_state_dict(state.get("layers", {}))
        self.alerts.load_state_dict(state.get("alerts", {}))
        self.kind_counts = {str(k): int(v) for k, v in dict(state.get("kinds", {})).items()}
