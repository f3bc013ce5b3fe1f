"""The report of a step: :class:`StepReport`, and the metric keys of a logging step.

Every key starts with :data:`METRIC_PREFIX` (``gradguard/``); the table is in the README and on
:class:`~lightning_gradguard.GradGuard`. A step's metrics are built from its host values, by name:
nothing here reads the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.keys import METRIC_PREFIX
from lightning_gradguard.primitives.text import plural

if TYPE_CHECKING:
    from lightning_gradguard.primitives.layout import OptimizerLayout

__all__ = ["METRIC_PREFIX", "StepReport", "layer_metrics", "summarize_run", "timestep_metrics"]



@dataclass
class StepReport:
    """What :meth:`GuardCore.step <lightning_gradguard.GuardCore.step>` found and did on one optimizer step.

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
        rolled_back: the guard rolled the run back to a snapshot at this step (``rollback``); the
            step itself is skipped, and ``event`` is the ``rollback`` event.
        event: the event recorded for this step, if any.
        logged: whether this was a logging step.
        metrics: on logging steps, every metric as ``{key: float}``; empty otherwise.
        layer_norms: on logging steps, the norm of each layer before clipping.
        timesteps: on logging steps, each tracked sequence's per-timestep norms (1-D CPU tensors).
        deferred: under ``on_nonfinite="warn"`` a non-logging step is not read on the host at all
            (no sync): its flags and events are settled at the next logging step or
            :meth:`GuardCore.flush <lightning_gradguard.GuardCore.flush>`; ``nonfinite`` and
            ``event`` are then left unset here.
        layer_order: on logging steps, the optimizer's layers in forward order.
        timestep_heat: on logging steps, each tracked sequence's recent (step, profile) pairs.
        layout: on logging steps, the optimizer's parameters and their layers (for histograms).

    Example::

        >>> import torch
        >>> from lightning_gradguard import GuardCore
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
    rolled_back: bool = False
    event: GradEvent | None = None
    logged: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    layer_norms: dict[str, float] = field(default_factory=dict)
    timesteps: dict[str, Tensor] = field(default_factory=dict)
    deferred: bool = False
    layer_order: list[str] = field(default_factory=list)
    timestep_heat: Mapping[str, Sequence[tuple[int, Tensor]]] = field(default_factory=dict, repr=False)
    layout: OptimizerLayout | None = field(default=None, repr=False, compare=False)


def layer_metrics(
    layer_names: Sequence[str], layer_ids: Sequence[int], values: Sequence[float]
) -> tuple[dict[str, float], dict[str, float]]:
    """(each present layer's norm by name, the same as ``gradguard/layer/<name>`` metrics).

    Example::

        >>> layer_metrics(["enc", "head"], [1], [0.5])
        ({'head': 0.5}, {'gradguard/layer/head': 0.5})
    """
    norms = {layer_names[i]: v for i, v in zip(layer_ids, values, strict=True)}
    return norms, {f"{METRIC_PREFIX}layer/{name}": v for name, v in norms.items()}


def timestep_metrics(summaries: dict[str, dict[str, float]]) -> dict[str, float]:
    """``gradguard/timestep/<name>/<summary>`` for each tracked sequence, and ``log10_first_last``
    (the first/last ratio spans ten decades between a healthy and a vanishing run: on a log scale a
    chart of it stays readable).

    Example::

        >>> timestep_metrics({"rnn": {"first_last_ratio": 1e-6, "horizon": 3.0}})
        {'gradguard/timestep/rnn/first_last_ratio': 1e-06, 'gradguard/timestep/rnn/horizon': 3.0, \
'gradguard/timestep/rnn/log10_first_last': -6.0}
    """
    out = {}
    for name, summary in summaries.items():
        for key, value in summary.items():
            out[f"{METRIC_PREFIX}timestep/{name}/{key}"] = value
        if "first_last_ratio" in summary:
            out[f"{METRIC_PREFIX}timestep/{name}/log10_first_last"] = _log10(summary["first_last_ratio"])
    return out


def _log10(x: float) -> float:
    if x != x:
        return math.nan
    return math.log10(x) if x > 0 else -math.inf


def summarize_run(
    steps: int,
    clip: Any,
    clipped_steps: int,
    counters: Any,
    kind_counts: dict[str, int],
    suppressed: int,
    *,
    empty_steps: int = 0,
    undelivered: tuple[int, int] = (0, 0),
) -> str:
    """The one-paragraph summary of a run (:meth:`GuardCore.summary <lightning_gradguard.GuardCore.summary>`).

    ``counters`` has the step policy's ``skipped_steps``, ``nonfinite_steps``, ``origins`` and
    ``amp_overflow_steps``; ``empty_steps`` of the ``steps`` had no gradient to measure (no
    optimizer, or every parameter frozen or unused); ``undelivered`` is the alerts the notifiers
    (a webhook) could not deliver: (failed, dropped).

    Example::

        >>> from types import SimpleNamespace
        >>> counters = SimpleNamespace(skipped_steps=1, nonfinite_steps=1, origins={"l1": 1}, amp_overflow_steps=0)
        >>> summarize_run(12, None, 0, counters, {"nonfinite": 1}, 1)
        'GradGuard summary: 12 optimizer steps guarded; no clipping configured; 1 skipped; 1 non-finite step ...
        >>> summarize_run(12, None, 0, counters, {"nonfinite": 1}, 1)[100:]
        '(origins: l1 x1) (1 repeated alert was rate-limited; all are in guard.events).'
        >>> summarize_run(12, None, 0, counters, {}, 0, empty_steps=12)[:96]
        'GradGuard summary: nothing guarded: none of the 12 steps had a gradient to measure (no optimizer'
    """
    guarded = steps - empty_steps
    if steps and not guarded:
        return (
            f"GradGuard summary: nothing guarded: none of the {plural(steps, 'step')} had a gradient to measure "
            "(no optimizer, or every parameter frozen or unused)."
        )
    if clip is None:
        clipped = "no clipping configured"
    else:
        frac = clipped_steps / guarded if guarded else 0.0
        clipped = f"{clipped_steps} clipped ({frac:.1%}) by {clip!r}"
    text = (
        f"GradGuard summary: {plural(guarded, 'optimizer step')} guarded; {clipped}; {counters.skipped_steps} skipped; "
        f"{plural(counters.nonfinite_steps, 'non-finite step')}"
    )
    if counters.origins:
        ranked = sorted(counters.origins.items(), key=lambda kv: -kv[1])
        text += " (origins: " + ", ".join(f"{k} x{v}" for k, v in ranked) + ")"
    if counters.amp_overflow_steps:
        text += f"; {plural(counters.amp_overflow_steps, 'fp16 overflow')} handled by the GradScaler"
    others = {k: v for k, v in kind_counts.items() if k not in ("nonfinite", "amp_overflow")}
    if others:
        text += "; events: " + ", ".join(f"{k} x{v}" for k, v in sorted(others.items()))
    if empty_steps:
        text += f"; {plural(empty_steps, 'step')} with no gradient to measure"
    if suppressed:
        was = "was" if suppressed == 1 else "were"
        text += f" ({plural(suppressed, 'repeated alert')} {was} rate-limited; all are in guard.events)"
    failed, dropped = undelivered
    if dropped or failed:
        text += (
            f"; {plural(dropped, 'alert')} never reached a person ({failed} failed to send after every retry, "
            f"{dropped - failed} dropped: a full queue, or still queued at the end)"
        )
    return text + "."
