"""Components: how a capability plugs into the guard without a branch in its orchestrator.

A :class:`GuardComponent` is an object with no-op hooks, a ``name`` and an ``order``. The guard
(:class:`~lightning_gradguard.GuardCore`) calls every component's hook at fixed points of a step, in
``order`` (lower first; ties keep the order they were given in), and keeps its state under its
name. Rollback, the device spike statistic, update tracking, replay attribution and per-timestep
tracking are components; so is anything a user passes as ``components=[...]``.

One step, and the hooks that run in it, in order::

    begin_step(step, logging)      before the forward pass (arm hooks, keep the RNG state)
    observe_loss(loss)             each micro-batch's loss, on the device
    gate(ctx) -> reason | None     before measuring: skip this step without a look (a skip list)
       -- the guard measures and clips --
    register(ctx)                  on the device: ctx.put(...) into the step's one read,
                                   ctx.flag(...) a named flag (a skip, or a trigger)
       -- the flags and ctx.reduced(...) values are summed across ranks, in one collective --
    flags_reduced(ctx)             on the device, with every rank's flags (feed statistics)
       -- the step's one host read; the policy decides (skip, warn, raise, stop) --
    skip_event(ctx, flag)          the event of a step skipped on this component's flag
    settle(ctx)                    on the host, after the decision (roll back; record events)
    report(ctx)                    logging steps: add metrics to ctx.report.metrics
    observe(ctx, obs)              fill the detectors' Observation (obs.updates, obs.extra, ...)
       -- the detectors run (a component adds its own with ``detectors()``) --
    end_step(ctx)                  the step is done (take a snapshot)
    enrich(ctx, event) -> event    any event recorded during the step (or a manual rollback's, with
                                   ctx None), before it is emitted

and, outside a step: ``setup(setup)`` once the run's objects exist, ``teardown()``,
``note_batch(epoch, batch_idx)``, ``on_skip_limit(cause)``, ``checkpoint_veto()`` (a reason the
run's state should not be saved now), ``restore_points()`` (the steps it may restore the run
to), ``state_dict()``/``load_state_dict()`` (the guard's checkpoint),
``snapshot_state()``/``load_snapshot_state()`` (a rollback's snapshot), ``config()`` (the options
recorded with the run).

Device work goes into :meth:`register` and :meth:`flags_reduced`, host work after the read: a
component never reads a tensor on the host itself (the step has one read). ``docs/writing-a-component.md``
walks through a complete one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.events import GradEvent

if TYPE_CHECKING:
    import torch

    from lightning_gradguard.core.decide import Verdict
    from lightning_gradguard.core.measure import Measurement
    from lightning_gradguard.core.step_report import StepReport
    from lightning_gradguard.detectors.base import Detector, Observation
    from lightning_gradguard.primitives.layout import OptimizerLayout

__all__ = ["GuardComponent", "Setup", "StepContext"]


@dataclass
class Setup:
    """What a component may need of the run, once its objects exist (:meth:`GuardComponent.setup`).

    Attributes:
        model: the watched model (None in a loop that gave none).
        optimizers: the optimizers known so far (one first seen by ``step`` is added then).
        schedulers: the learning-rate schedulers.
        scaler: the fp16 GradScaler, or None.
        rank: this process's global rank; ``world_size``: how many processes.
        sharded: the parameters are shards (FSDP, DTensor).
        log_dir: where the run writes its files (the Trainer's ``default_root_dir``), or None.
        gather: under data parallelism, gathers a host object from every data-parallel rank (a
            collective: every rank calls it on the same steps); None on one process.
        record: records an event (what the guard records, it emits and keeps).
        guard_state, load_guard_state: the guard's own state for a snapshot (its clipper's, its
            detectors' and every component's ``snapshot_state``), and its restore.
    """

    model: nn.Module | None = None
    optimizers: Sequence[torch.optim.Optimizer] = ()
    schedulers: Sequence[Any] = ()
    scaler: Any = None
    rank: int = 0
    world_size: int = 1
    sharded: bool = False
    log_dir: str | None = None
    gather: Callable[[Any], list[Any]] | None = None
    record: Callable[[GradEvent], GradEvent] = field(default=lambda event: event, repr=False)
    guard_state: Callable[[], Any] = field(default=dict, repr=False)
    load_guard_state: Callable[[Any], None] = field(default=lambda state: None, repr=False)


class StepContext:
    """One optimizer step, as the components see it.

    Attributes:
        number: the step number; ``optimizer``, ``optimizer_idx``: the optimizer being stepped.
        logging: a logging step; ``log_next``: the next step logs.
        layout: the optimizer's parameters and their layers.
        measurement: the device measurement (gradients, norms, total), None before :meth:`register`'s
            stage and on a step read later (its gradients are gone then).
        read: the step's one host read: values put before it are floats after it, by name.
        loss: the mean observed loss of the step (0-d, device), or None.
        report: the step's report, once the decision is taken; ``verdict``: its flags, read.
        skip_reason: why the step was skipped (``"nonfinite"``, or a skip flag's reason), or None.
        replay_closure, replay_precision: what ``GuardCore.step`` was given to replay the step.
        deferred: the step is settled later (its read waits for a logging step).
    """

    def __init__(self, number: int, optimizer: torch.optim.Optimizer, optimizer_idx: int, layout: OptimizerLayout,
                 *, logging: bool, log_next: bool, loss: Tensor | None = None,
                 replay_closure: Callable[[], Any] | None = None,
                 replay_precision: Callable[[], Any] | None = None,
                 record: Callable[[StepContext, GradEvent], GradEvent] = lambda ctx, event: event,
                 skip: Callable[[StepContext, str, bool], None] | None = None) -> None:  # fmt: skip
        self.number = number
        self.optimizer = optimizer
        self.optimizer_idx = optimizer_idx
        self.layout = layout
        self.logging = logging
        self.log_next = log_next
        self.loss = loss
        self.replay_closure = replay_closure
        self.replay_precision = replay_precision
        self.measurement: Measurement | None = None
        self.read = HostRead()
        self.report: StepReport | None = None
        self.verdict: Verdict | None = None
        self.skip_reason: str | None = None
        self.deferred = False
        # the core's own values of the step (norms, owners, total, the layers a logging step read)
        self.norms: Tensor | None = None
        self.owners: Sequence[int] = ()
        self.total: Tensor | None = None
        self.layer_ids: Sequence[int] = ()
        self.rollback_request: str | None = None  # a component's request for a rollback (request_rollback)
        self._record = record
        self._skip = skip
        self._flags: dict[str, Tensor] = {}
        self._skip_flags: dict[str, str] = {}  # skip flag -> the reason a skip list records
        self._owners: dict[str, GuardComponent] = {}  # flag -> the component that raised it
        self._reduced: dict[str, Tensor] = {}
        self._local: dict[str, Tensor] = {}
        self.extra: dict[str, Any] = {}  # per-step values components hand each other (by their own keys)

    # ------------------------------------------------------------ on the device, before the read
    def put(self, name: str, tensor: Tensor) -> None:
        """Add ``tensor`` to the step's one host read; after it, ``ctx.read[name]`` (a 0-d tensor: one
        value) or ``ctx.read.vector(name)`` (any other shape, flattened)."""
        if tensor.dim() == 0:
            self.read.put_each((name,), tensor.reshape(1))
        else:
            self.read.put(name, tensor)

    def flag(self, name: str, value: Tensor, *, skip: bool = False, reason: str | None = None) -> None:
        """Raise the named flag (a 0-d tensor on the gradients' device: 0 or 1). Every flag is summed
        across ranks with the others in one collective, and read once: ``ctx.raised(name)`` after the
        read. ``skip=True``: a raised flag skips the step, on the device with a fused optimizer, exactly
        as a non-finite one (:meth:`GuardComponent.skip_event` words its event; ``reason``, default the
        flag's name, is what the skip list records)."""
        self._flags[name] = value
        if skip:
            self._skip_flags[name] = reason or name

    def reduced(self, name: str, tensor: Tensor) -> None:
        """Add ``tensor`` (1-D, on the gradients' device) to the values summed across ranks with the
        flags (one collective), then read: ``ctx.read.vector(name)``."""
        self._reduced[name] = tensor

    def local(self, name: str) -> Tensor | None:
        """This rank's own value of a flag, before the sum across ranks (None if it was not raised)."""
        return self._local.get(name)

    # ------------------------------------------------------------ on the host, after the read
    def raised(self, name: str) -> bool:
        """Whether the named flag was raised on any rank (after the read)."""
        return name in self.read and self.read[name] > 0

    def record(self, event: GradEvent) -> GradEvent:
        """Record an event: kept by the guard, emitted to the alert router (rate-limited alerts), the
        handlers and the sinks (TensorBoard, ``gradguard report``)."""
        return self._record(self, event)

    def skip(self, cause: str, *, rolled_back: bool = False) -> None:
        """Skip this step now, on the host (every optimizer's gradients to None), counted by the policy:
        for ``settle``, after the step's decision."""
        if self._skip is None or self.report is None:
            raise RuntimeError("StepContext.skip() is for settle(): after the step's decision")
        self._skip(self, cause, rolled_back)

    def request_rollback(self, cause: str) -> None:
        """Ask for a rollback at the end of this step (in ``settle``, from a component ordered before
        the ``recovery`` component, 80, which takes it); the first request's cause is kept."""
        if self.rollback_request is None:
            self.rollback_request = cause

    def headline(self, event: GradEvent) -> None:
        """Make ``event`` the step's report's event (what a loop or an adapter acts on)."""
        if self.report is not None:
            self.report.event = event


class GuardComponent:
    """A capability of the guard, plugged in by its hooks (see the module's docstring for their order).

    Subclass it and override the hooks you need; every hook is a no-op here. Give it a ``name`` (its
    state lives under ``{"components": {name: ...}}`` in the guard's checkpoint) and, if it must run
    before or after others, an ``order`` (default 100; the built-in components use 10 to 90).

    Attributes:
        name: the component's key in the guard's state and its events' source.
        order: lower runs first, at every hook.
        needs_host: it needs the step's values on the host every step (the guard then never defers a
            step's read: no step without a host read).

    Example: a component that counts the steps whose total norm is above 1, on the device::

        >>> import torch
        >>> from lightning_gradguard import GuardCore, GuardComponent
        >>> class Above1(GuardComponent):
        ...     name = "above_1"
        ...     def __init__(self):
        ...         self.count = 0
        ...     def register(self, ctx):
        ...         ctx.put("above_1", (ctx.measurement.total > 1).float())
        ...     def settle(self, ctx):
        ...         self.count += int(ctx.read["above_1"])
        ...     def state_dict(self):
        ...         return {"count": self.count}
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> guard = GuardCore(components=[Above1()])
        >>> _ = guard.step(torch.optim.SGD([p], lr=0.1))
        >>> guard.state_dict()["components"]["above_1"]
        {'count': 1}
    """

    name: str = ""
    order: int = 100
    needs_host: bool = False

    # ------------------------------------------------------------------ the run
    def setup(self, setup: Setup) -> None:
        """The run's objects exist (the model's parameters are final)."""

    def teardown(self) -> None:
        """The guard is detached: remove hooks, let threads finish."""

    def config(self) -> dict[str, Any]:
        """Options recorded with the run (TensorBoard's ``gradguard/config``), as plain values."""
        return {}

    def detectors(self) -> Sequence[Detector]:
        """Detectors this component adds (they run after the built-in ones, with the same Observation)."""
        return ()

    def note_batch(self, epoch: int, batch_idx: int) -> None:
        """The batch being trained (each micro-batch, before its forward pass)."""

    def on_skip_limit(self, cause: str) -> bool:
        """``max_consecutive_skips`` was reached: return True to take over (the guard then does not
        raise); called on every component in order until one does."""
        return False

    def restore_points(self) -> list[int]:
        """The steps this component may still restore the run to (a rollback's snapshots): the
        checkpoint gate keeps a checkpoint from at or before the oldest."""
        return []

    def checkpoint_veto(self) -> str | None:
        """A reason why the run's state should not be kept in a checkpoint now (a rollback pending, a
        streak in progress), or None; asked on the host before a save (the same on every rank)."""
        return None

    # ------------------------------------------------------------------ a step
    def begin_step(self, step: int, logging: bool) -> None:
        """Before the forward pass(es) of an optimizer step (each micro-batch calls it)."""

    def observe_loss(self, loss: Tensor) -> None:
        """A micro-batch's loss, before its backward (on the device: read nothing)."""

    def gate(self, ctx: StepContext) -> str | None:
        """Before measuring: a reason to skip this step without looking at it, or None."""
        return None

    def register(self, ctx: StepContext) -> None:
        """On the device, after measuring and clipping: values into ``ctx.put``, flags into ``ctx.flag``."""

    def flags_reduced(self, ctx: StepContext, flags: dict[str, Tensor]) -> None:
        """On the device, every rank's flags summed (``flags`` by name, 0-d tensors): no host read."""

    def skip_event(self, ctx: StepContext, flag: str) -> GradEvent | None:
        """The event of a step skipped on this component's skip flag ``flag`` (the policy counts it)."""
        return None

    def settle(self, ctx: StepContext) -> None:
        """On the host, after the step's decision: act, record events."""

    def report(self, ctx: StepContext) -> None:
        """A logging step's report: add metrics (``ctx.report.metrics``)."""

    def observe(self, ctx: StepContext, obs: Observation) -> None:
        """Fill the detectors' Observation with what this component measured."""

    def end_step(self, ctx: StepContext) -> None:
        """The step is settled, detected and reported."""

    def enrich(self, ctx: StepContext | None, event: GradEvent) -> GradEvent:
        """An event recorded during the step (``ctx`` None: outside one, a manual rollback), before it
        is emitted: return it, or a richer copy."""
        return event

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The component's state in the guard's checkpoint (plain values; ``{}``: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run; may come before :meth:`setup`)."""

    def load_legacy(self, state: dict[str, Any]) -> None:
        """A checkpoint written before the guard's state went by component (0.2.x, 0.3.x): read this
        component's part of the flat ``state`` (the built-in components do; a new one has none)."""

    def snapshot_state(self) -> Any:
        """What a rollback's snapshot keeps of the component (default: its :meth:`state_dict`)."""
        return self.state_dict()

    def load_snapshot_state(self, state: Any) -> None:
        """Restore :meth:`snapshot_state` (a rollback)."""
        if state:
            self.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
