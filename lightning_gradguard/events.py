"""Gradient events: what the guard noticed, at which step, where, and how bad.

A :class:`GradEvent` is a plain, picklable record. The guard appends each one to ``guard.events``
and hands it to the alerting layer (:mod:`lightning_gradguard.core.alerts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["KINDS", "EventKind", "GradEvent"]

# The kinds the built-in stages and components record; a component of yours records its own (any
# short word): ``EventKind`` is a ``str`` at run time, this list is the documentation of the built-in.
KindLiteral = Literal[
    "nonfinite",
    "amp_overflow",
    "exploding",
    "spike",
    "vanishing",
    "dead",
    "unused",
    "loss_scale_collapse",
    "vanishing_in_time",
    "exploding_in_time",
    "stopped",
    "rollback",
    "spike_skipped",
    "update_spike",
    "moment_collapse",
]
KINDS: tuple[str, ...] = KindLiteral.__args__  # type: ignore[attr-defined]
EventKind = str


@dataclass(frozen=True)
class GradEvent:
    """One thing the guard noticed about the gradients of one optimizer step.

    Args:
        kind: what happened: ``"nonfinite"`` (NaN or Inf gradients, or a non-finite loss),
            ``"amp_overflow"`` (an fp16 overflow that the GradScaler already handles),
            ``"exploding"`` (total norm above ``explode_threshold``), ``"spike"`` (z-score of
            log-norm above ``spike_zscore``; ``value`` holds z), ``"vanishing"`` (layers below the
            vanishing thresholds for ``vanish_patience`` logging steps), ``"dead"`` (exactly-zero
            gradients), ``"unused"`` (no gradient while requiring grad), ``"loss_scale_collapse"``
            (fp16 loss scale below ``min_loss_scale``; ``value`` holds it), or
            ``"vanishing_in_time"`` / ``"exploding_in_time"`` (the per-timestep gradient profile of
            a recurrent module; ``value`` holds its first/last ratio), or ``"stopped"`` (the guard
            ended the run: ``max_consecutive_skips`` reached, or ``on_nonfinite`` ``"raise"`` or
            ``"stop"``; ``extra["cause"]`` says which, ``origin`` and ``layers`` are those of the
            fault that ended it), or ``"rollback"`` (the guard restored a snapshot: ``value`` is the
            snapshot's step; ``extra`` holds ``cause``, ``from_step``, ``snapshot_step``,
            ``batch_ranges`` (the batches undone, ``[epoch, first, last]`` each), ``batch_count``,
            ``rollbacks``), or ``"spike_skipped"`` (a finite step skipped for a
            total norm or loss far above its rolling statistics, ``skip_spikes``; ``extra["zscore"]``), or
            ``"update_spike"`` / ``"moment_collapse"`` (``track_updates``: the update-to-weight ratio
            far above its recent values; a layer's smallest Adam √v fallen by decades while its
            gradient did not), or a component's own kind (``docs/writing-a-component.md``).
        step: the optimizer step (``trainer.global_step`` as ``training_step`` saw it).
        layers: the layers concerned: for ``nonfinite`` every layer whose gradient is non-finite,
            in forward order; for ``spike`` the layers that grew most against their own recent
            norms; for ``vanishing``/``dead``/``unused`` exactly the layers concerned.
        origin: where the fault began: ``"loss"`` when the loss itself was non-finite, otherwise the
            non-finite layer that runs first in the backward pass (the last in forward order), or
            ``None`` when it cannot be told.
        value: the total gradient norm before clipping (``nan`` or ``inf`` for a non-finite step).
        message: a one-line, human-readable description.
        optimizer_idx: index of the optimizer in ``trainer.optimizers`` (0 for a single optimizer).
        action: what the guard did: ``"skipped"``, ``"warned"``, ``"raised"``, ``"stopped"``,
            ``"skipped by the GradScaler"`` (a non-finite loss under fp16: the scaler skips the step),
            ``"rolled back"`` or ``"none"``.

    Example::

        >>> ev = GradEvent("nonfinite", step=7, layers=("enc", "head"), origin="head",
        ...                value=float("nan"), message="NaN gradient")
        >>> ev.kind, ev.origin, ev.as_dict()["step"]
        ('nonfinite', 'head', 7)
    """

    kind: EventKind
    step: int
    layers: tuple[str, ...] = ()
    origin: str | None = None
    value: float = float("nan")
    message: str = ""
    optimizer_idx: int = 0
    action: str = "none"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """Return the event as a plain dict (for JSON, checkpoints and handlers)."""
        return asdict(self)
