"""The decision of a step: is it healthy, an fp16 overflow, or non-finite, and what to do about it.

Two halves, on either side of the step's one host read:

* on the device, :func:`device_flags` makes three flags (non-finite gradient, non-finite loss,
  fp16 overflow), which the step sums across ranks with the caller's ``reduce`` together with the
  components' named flags (``spike_skip``, ``spike_high``, a user's), so that every rank reads the
  same flags and takes the same decision (a NaN on one rank only skips the step everywhere);
* on the host, :class:`StepPolicy` acts on the flags it reads: ``"skip"`` sets every gradient of the
  optimizer to None (torch optimizers then leave weights and state alone), ``"stop"`` skips and asks
  the loop to stop, ``"raise"`` raises :class:`~lightning_gradguard.errors.NonFiniteGradientError`,
  ``"warn"`` only reports. ``max_consecutive_skips`` skipped steps in a row raise too: a run never
  skips forever in silence.

With an optimizer whose step honours ``found_inf`` (fused ``Adam``, ``AdamW``, ``SGD``, ``Adagrad``:
the attribute the GradScaler sets), :class:`DeviceSkip` skips a non-finite step on the device
instead: ``optimizer.found_inf`` is the step's flag, and the fused kernel leaves the weights, their
state and the step counters untouched when it is 1. Nothing is read on the host, so a healthy step
needs no sync; the step's event and counters settle with the next logging step's read.

The policy owns the step counters (skipped, non-finite, fp16 overflows, consecutive skips, origins, and
the steps skipped on each component's flag) and the message text of ``nonfinite`` and
``amp_overflow`` events; a component that raised a skip flag words its own event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.detectors.nonfinite import describe_nonfinite, nonfinite_tensors, origin_of
from lightning_gradguard.errors import NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.layout import LayerMap, OptimizerLayout
from lightning_gradguard.primitives.norms import device_constant
from lightning_gradguard.primitives.text import plural

__all__ = ["FLAGS", "DeviceSkip", "OnNonFinite", "StepPolicy", "Verdict", "can_skip_on_device", "device_flags"]

OnNonFinite = Literal["skip", "warn", "raise", "stop"]
POLICIES = ("skip", "warn", "raise", "stop")
# The core's flags: names in the step's HostRead, and the device_flags order. Components add their
# own by name (StepContext.flag).
FLAGS = ("grad_bad", "loss_bad", "amp_bad")
_ACTIONS = {"skip": "skipped", "stop": "stopped", "raise": "raised", "warn": "warned"}
SCALER_SKIPPED = "skipped by the GradScaler"  # the action of a non-finite loss under fp16


def device_flags(m: Measurement, loss_finite: Tensor | None) -> list[Tensor]:
    """[gradient non-finite, loss non-finite, fp16 overflow], in :data:`FLAGS` order, as 0-d float32
    tensors on the device (no host sync). The step stacks them with its other values; under DDP the
    stack is summed across ranks, so that every rank reads the same flags."""
    one = device_constant(1.0, m.zero.device)
    bad = [torch.where(m.finite, m.zero, one), m.zero, m.zero]
    if m.shared_flags is not None:  # already summed over every rank with the sharded norms
        bad[1], bad[2] = m.shared_flags[0], m.shared_flags[1]
        if m.inv_scale is not None and m.amp_found is not None:
            bad[2] = m.amp_found.to(m.zero.device).float()  # from the global total: the same on every rank
        return bad
    if loss_finite is not None:
        bad[1] = torch.where(loss_finite.to(m.zero.device), m.zero, one)
    if m.amp_found is not None:
        bad[2] = m.amp_found.to(m.zero.device).float()
    return bad


def can_skip_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` (the fused Adam, AdamW, SGD, Adagrad).

    Example::

        >>> import torch
        >>> p = [torch.nn.Parameter(torch.ones(2))]
        >>> can_skip_on_device(torch.optim.AdamW(p, fused=True)), can_skip_on_device(torch.optim.AdamW(p))
        (True, False)
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


class DeviceSkip:
    """Skips a step on the device: ``optimizer.found_inf`` = the step's skip flag (0-d float32, 1.0 for
    a non-finite gradient or loss, or a component's skip flag, on any rank), removed again by a step
    post-hook.

    Example::

        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.full((2,), float("nan"))
        >>> opt = torch.optim.AdamW([p], fused=True)
        >>> skip = DeviceSkip()
        >>> skip.arm(opt, torch.tensor(1.0))
        >>> opt.step()
        >>> p.tolist(), hasattr(opt, "found_inf"), opt.state[p]["step"].item()
        ([1.0, 1.0], False, 0.0)
    """

    def __init__(self) -> None:
        self._armed: dict[int, Tensor] = {}
        self._hooks: dict[int, RemovableHandle] = {}

    def arm(self, optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
        """Set ``found_inf`` from the step's skip flag (the reduced sum of the flags that skip; no host sync)."""
        found = skip.clamp(max=1.0).to(torch.float32)
        key = id(optimizer)
        if key not in self._hooks:
            self._hooks[key] = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.disarm(opt))
        optimizer.found_inf = found  # type: ignore[attr-defined]
        self._armed[key] = found

    def disarm(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the ``found_inf`` this object set (after the step, or when a step is not skipped on
        the device); one the GradScaler set is left alone."""
        found = self._armed.pop(id(optimizer), None)
        if found is not None and getattr(optimizer, "found_inf", None) is found:
            del optimizer.found_inf  # type: ignore[attr-defined]

    def remove(self) -> None:
        """Remove the post-hooks (the guard is detached)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._armed.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"_armed": {}, "_hooks": {}}  # bound to live optimizers


@dataclass
class Verdict:
    """The host view of one step's flags."""

    grad_bad: bool
    loss_bad: bool
    amp_bad: bool
    skips: tuple[str, ...] = ()  # the components' skip flags raised (on any rank), in their order

    @classmethod
    def of(cls, read: HostRead, skip_flags: Sequence[str] = ()) -> Verdict:
        return cls(
            read["grad_bad"] > 0, read["loss_bad"] > 0, read["amp_bad"] > 0,
            tuple(name for name in skip_flags if read[name] > 0),
        )  # fmt: skip

    @property
    def skipped_by_flag(self) -> bool:
        """A finite step that a component's flag skips."""
        return bool(self.skips) and self.finite

    @property
    def finite(self) -> bool:
        """No overflow, no non-finite gradient or loss."""
        return not (self.grad_bad or self.loss_bad or self.amp_bad)

    @property
    def nonfinite(self) -> bool:
        """A fault: a non-finite loss (even one the fp16 GradScaler skips: it is not an overflow), or
        a non-finite gradient that no GradScaler handles."""
        return self.loss_bad or (self.grad_bad and not self.amp_bad)

    @property
    def overflow(self) -> bool:
        """A plain fp16 overflow of a finite loss: the GradScaler's business (it skips, lowers its scale)."""
        return self.amp_bad and not self.loss_bad


@dataclass
class Fault:
    """Where a non-finite step is: what the policy needs to name its layers and to skip it."""

    step: int
    total: Tensor
    norms: Tensor
    owners: Sequence[int]
    layout: OptimizerLayout
    params: Sequence[Tensor]
    optimizer_idx: int


class StepPolicy:
    """Acts on a step's verdict and keeps the step counters.

    Args:
        on_nonfinite: ``"skip"``, ``"warn"``, ``"raise"`` or ``"stop"``.
        max_consecutive_skips: the skipped step that makes this many in a row raises.
        layers: the layer map, for the forward order that names a fault's origin.
        recover: called with the cause when ``max_consecutive_skips`` is reached; True when it takes
            over (a rollback), and then nothing is raised.

    Example::

        >>> policy = StepPolicy("skip", 25, LayerMap())
        >>> policy.defers(is_log=False, needs_host=False), StepPolicy("warn", 25, LayerMap()).defers(False, False)
        (False, True)
    """

    def __init__(
        self,
        on_nonfinite: OnNonFinite,
        max_consecutive_skips: int,
        layers: LayerMap,
        recover: Callable[[str], bool] | None = None,
    ) -> None:
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.layers = layers
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.consecutive_skips = 0
        self.stopped = False  # the stop event of on_nonfinite="stop" is recorded once
        self.amp_overflow_steps = 0
        self.max_total_norm = 0.0  # the largest finite total norm (host: read with each step's flags)
        self.origins: dict[str, int] = {}
        self.skipped_by: dict[str, int] = {}  # steps skipped on each component's flag
        # Called with the cause when max_consecutive_skips is reached: True when a component (a
        # rollback) takes over (then nothing is raised here).
        self.recover = recover

    @property
    def spike_skipped_steps(self) -> int:
        """Finite steps skipped as spikes (the ``spike_skip`` flag of ``skip_spikes``)."""
        return self.skipped_by.get("spike_skip", 0)

    def on_device(self, optimizer: torch.optim.Optimizer, is_log: bool, needs_host: bool, scaler_on: bool) -> bool:
        """Whether this step is skipped on the device (:class:`DeviceSkip`) and its read deferred:
        ``skip`` or ``stop``, an optimizer that honours ``found_inf``, no GradScaler (it owns that
        attribute), no clipper that needs the host, not a logging step (it reads anyway)."""
        return (
            self.on_nonfinite in ("skip", "stop")
            and not is_log
            and not needs_host
            and not scaler_on
            and can_skip_on_device(optimizer)
        )

    def defers(self, is_log: bool, needs_host: bool, on_device: bool = False) -> bool:
        """Whether this step's read can wait: nothing on the host depends on it now (``warn``, which
        does not skip, or a step skipped on the device)."""
        return on_device or (self.on_nonfinite == "warn" and not is_log and not needs_host)

    def decide(
        self,
        verdict: Verdict,
        total: float,
        fault: Callable[[], Fault],
        record: Callable[[GradEvent], GradEvent],
        skip_event: Callable[[str], GradEvent | None] = lambda flag: None,
    ) -> tuple[GradEvent | None, bool]:
        """Act on one step: (the event recorded, whether the step was skipped).

        ``fault`` builds the step's :class:`Fault` (only a faulty step needs it); ``skip_event(flag)``
        the event of a step skipped on a component's flag (worded by that component).

        Raises:
            NonFiniteGradientError: under ``"raise"`` on a non-finite step, or when
                ``max_consecutive_skips`` steps in a row were skipped (after recording the event).
        """
        if verdict.overflow:
            self.amp_overflow_steps += 1
            where = fault()
            return record(self._overflow_event(where.step, total, where.optimizer_idx)), False
        if verdict.nonfinite:
            return self._nonfinite(fault(), verdict.loss_bad, record, by_scaler=verdict.amp_bad)
        if verdict.skipped_by_flag:
            return self._flag_skip(fault(), verdict.skips[0], skip_event, record), True
        self.consecutive_skips = 0
        if math.isfinite(total):
            self.max_total_norm = max(self.max_total_norm, total)
        return None, False

    @staticmethod
    def _overflow_event(step: int, total: float, optimizer_idx: int) -> GradEvent:
        return GradEvent(
            "amp_overflow",
            step=step,
            value=total,
            message=f"GradGuard: fp16 overflow at step {step}; the GradScaler skips this step and lowers its scale.",
            optimizer_idx=optimizer_idx,
            action="none",
        )

    def _nonfinite(
        self, fault: Fault, loss_bad: bool, record: Callable[[GradEvent], GradEvent], by_scaler: bool = False
    ) -> tuple[GradEvent, bool]:
        """A fault: count it, skip it (unless the GradScaler already does), record it, raise if asked."""
        self.nonfinite_steps += 1
        action = _ACTIONS[self.on_nonfinite]
        if by_scaler and self.on_nonfinite in ("skip", "warn"):
            action = SCALER_SKIPPED
        event = self._nonfinite_event(fault, loss_bad, action)
        skip = self.on_nonfinite in ("skip", "stop") and not by_scaler
        if skip:
            self._skip(fault)
        key = event.origin or "unknown"
        self.origins[key] = self.origins.get(key, 0) + 1
        event = record(event)  # as recorded: with the replay's verdict, when the step was replayed
        if self.on_nonfinite == "raise":
            record(_stop_event(event, "on_nonfinite='raise'", "raised"))
            raise NonFiniteGradientError(event.message, event)
        self._check_limit(event, record)
        if self.on_nonfinite == "stop" and not self.stopped:
            self.stopped = True
            record(_stop_event(event, "on_nonfinite='stop'", "stopped"))
        return event, skip

    def _skip(self, fault: Fault) -> None:
        for p in fault.params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive_skips += 1

    def _check_limit(self, event: GradEvent, record: Callable[[GradEvent], GradEvent]) -> None:
        """``max_consecutive_skips`` skipped steps in a row: a rollback takes over, or the run ends."""
        if self.consecutive_skips < self.max_consecutive_skips:
            return
        limit = self.max_consecutive_skips
        cause = f"{self.consecutive_skips} consecutive skipped steps (max_consecutive_skips={limit})"
        if self.recover is not None and self.recover(cause):
            return
        record(_stop_event(event, cause, "raised"))
        raise NonFiniteGradientError(
            f"GradGuard: {plural(self.consecutive_skips, 'consecutive optimizer step')} "
            f"{'was' if self.consecutive_skips == 1 else 'were'} skipped "
            f"(max_consecutive_skips={self.max_consecutive_skips}); the run is not recovering. "
            f"Last: {event.message}",
            event,
        )

    def _flag_skip(
        self,
        fault: Fault,
        flag: str,
        skip_event: Callable[[str], GradEvent | None],
        record: Callable[[GradEvent], GradEvent],
    ) -> GradEvent:
        """A finite step skipped on a component's flag (on the device already, or here: every gradient
        to None), counted here, worded by the component."""
        self._skip(fault)
        self.skipped_by[flag] = self.skipped_by.get(flag, 0) + 1
        event = skip_event(flag) or GradEvent(
            "skipped", step=fault.step, optimizer_idx=fault.optimizer_idx, action="skipped",
            message=f"GradGuard: skipped step {fault.step} ({flag}).", extra={"flag": flag},
        )  # fmt: skip
        event = record(event)
        self._check_limit(event, record)
        return event

    def restart_streak(self) -> None:
        """The run went back to before its skips (a rollback): the run of skips starts again."""
        self.consecutive_skips = 0

    def skip_unmeasured(self, params: Sequence[Tensor]) -> None:
        """Skip a step without measuring it (a component's gate: a batch of the skip list)."""
        for p in params:
            p.grad = None
        self.skipped_steps += 1

    def skip_settled(self, params: Sequence[Tensor], already: bool) -> None:
        """Skip a step after its decision (a rollback): every gradient to None, counted once, and the
        run of skips starts again (the state goes back to before them)."""
        for p in params:
            p.grad = None
        if not already:
            self.skipped_steps += 1
        self.restart_streak()

    def _nonfinite_event(self, fault: Fault, loss_bad: bool, action: str) -> GradEvent:
        """The ``nonfinite`` event: its layers in forward order and its origin (one more host read)."""
        layout = fault.layout
        bad_layers = {layout.param_layer[fault.owners[i]] for i in nonfinite_tensors(fault.norms)}
        names = [layout.layer_names[i] for i in self.layers.ordered(layout, bad_layers)]
        origin = origin_of(names, loss_bad)
        # The origin rests on the forward order recorded on the first pass. A layer that did not run
        # then (a conditional branch) has no known place in it: say that the origin is uncertain.
        unplaced = [layout.layer_names[i] for i in bad_layers if layout.layer_seen and not layout.layer_seen[i]]
        certain = loss_bad or not unplaced
        total = float(fault.total) if fault.total.numel() else math.nan
        message = describe_nonfinite(fault.step, names, origin, total, action, fault.optimizer_idx)
        if not certain:
            message += (
                f" (Origin uncertain: {', '.join(sorted(unplaced))} did not run in the recorded "
                "forward pass, so their place in the order is unknown.)"
            )
        return GradEvent(
            "nonfinite",
            step=fault.step,
            layers=tuple(names),
            origin=origin,
            value=total,
            message=message,
            optimizer_idx=fault.optimizer_idx,
            action=action,
            extra={"origin_certain": certain},
        )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_skips": self.consecutive_skips,
            "amp_overflow_steps": self.amp_overflow_steps,
            "max_total_norm": self.max_total_norm,
            "origins": dict(self.origins),
        }
        return {**state, "skipped_by": dict(self.skipped_by)} if self.skipped_by else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.amp_overflow_steps = int(state.get("amp_overflow_steps", 0))
        self.max_total_norm = float(state.get("max_total_norm", 0.0))
        self.origins = {str(k): int(v) for k, v in dict(state.get("origins", {})).items()}
        self.skipped_by = {str(k): int(v) for k, v in dict(state.get("skipped_by", {})).items()}
        if state.get("spike_skipped_steps"):  # 0.3.0 kept the one flag's count at the top level
            self.skipped_by["spike_skip"] = int(state["spike_skipped_steps"])


def _stop_event(fault: GradEvent, cause: str, action: str) -> GradEvent:
    """The event of the guard ending the run, after the fault ``fault`` (its origin and layers)."""
    where = f"origin '{fault.origin}'" if fault.origin else "origin unknown"
    advice = (
        "the forward pass or the loss broke: look at a dump (dump_dir=...) of the first bad step"
        if fault.origin == "loss"
        else f"the gradient broke first at {fault.origin}: look at a dump (dump_dir=...) of the first bad step"
        if fault.origin
        else "look at a dump (dump_dir=...) of the first bad step"
    )
    return GradEvent(
        "stopped",
        step=fault.step,
        layers=fault.layers,
        origin=fault.origin,
        value=fault.value,
        message=f"GradGuard stopped the run at step {fault.step}: {cause}; the last fault's {where}. Next: {advice}.",
        optimizer_idx=fault.optimizer_idx,
        action=action,
        extra={"cause": cause},
    )
