"""What a guard reports between steps: its counters, its recorded events, its components' readouts and
the run's one-paragraph summary, read from the stages and components that own them (a mixin of
:class:`~lightning_gradguard.GuardCore`: the owners are the policy, the clip stage and the components;
nothing here is kept twice)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_gradguard.core.step_report import summarize_run
from lightning_gradguard.events import GradEvent

if TYPE_CHECKING:
    from lightning_gradguard.clip import Clipper
    from lightning_gradguard.core.alerts import AlertRouter
    from lightning_gradguard.core.clipping import ClipStage
    from lightning_gradguard.core.component import GuardComponent
    from lightning_gradguard.core.decide import StepPolicy

__all__ = ["GuardReadouts"]


class GuardReadouts:
    """The read-only view of a guard's run so far (see :class:`~lightning_gradguard.GuardCore`)."""

    policy: StepPolicy
    clipping: ClipStage
    alerts: AlertRouter
    kind_counts: dict[str, int]
    steps: int
    empty_steps: int
    _events: deque[GradEvent]

    if TYPE_CHECKING:  # GuardCore's

        def component(self, name: str) -> GuardComponent | None: ...

        def flush(self) -> None: ...

    # ------------------------------------------------------------- reporting
    @property
    def clip(self) -> Clipper | None:
        """The clipper, or None."""
        return self.clipping.clip

    @property
    def recovery(self) -> Any:
        """The ``rollback`` option's component (:class:`~lightning_gradguard.core.recovery.Recovery`), or None."""
        return self.component("recovery")

    @property
    def spike(self) -> Any:
        """The spike statistic (:class:`~lightning_gradguard.core.spike.SpikeStatistic`), or None when
        ``spike_zscore``, ``skip_spikes`` and a rollback's ``spike_zscore`` are all off."""
        return self.component("spike")

    @property
    def timesteps(self) -> Any:
        """The per-timestep tracker (:class:`~lightning_gradguard.core.timesteps.TimestepTracker`), or None."""
        tracking: Any = self.component("timesteps")
        return tracking.tracker if tracking is not None else None

    @property
    def rollbacks(self) -> int:
        """Rollbacks made so far (0 without the ``rollback`` option)."""
        recovery = self.recovery
        return int(recovery.rollbacks) if recovery is not None else 0

    @property
    def skip_list(self) -> list[dict[str, Any]]:
        """The skipped and rolled-back batches: one entry per batch, ``{"epoch", "batch_idx", "step",
        "reason", "steps", "reasons"}`` (``step`` and ``reason``: the first of ``steps`` and ``reasons``)."""
        recovery = self.recovery
        return list(recovery.skips) if recovery is not None else []

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
        tracking: Any = self.component("timesteps")
        return tracking.history.norms if tracking is not None else {}

    @property
    def timestep_summaries(self) -> dict[str, dict[str, float]]:
        """Each tracked sequence's profile summary at the last logging step."""
        tracking: Any = self.component("timesteps")
        return tracking.history.summaries if tracking is not None else {}

    @property
    def timestep_heat(self) -> dict[str, deque[tuple[int, Tensor]]]:
        """Each tracked sequence's recent (step, profile) pairs."""
        tracking: Any = self.component("timesteps")
        return tracking.history.heat if tracking is not None else {}

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

            >>> from lightning_gradguard import GuardCore
            >>> GuardCore().summary()
            'GradGuard summary: 0 optimizer steps guarded; no clipping configured; 0 skipped; 0 non-finite steps.'
        """
        self.flush()
        quiet = sum(self.alerts.suppressed.values())
        return summarize_run(self.steps, self.clip, self.clipped_steps, self.policy, self.kind_counts, quiet,
                             empty_steps=self.empty_steps, undelivered=self.alerts.undelivered())  # fmt: skip

