"""The framework-free guard: one optimizer step as a short pipeline of stages.

==================  ======================================================================
module              stage
==================  ======================================================================
:mod:`.guard`       :class:`GuardCore`: the options, the state, and ``step()`` as the data path
:mod:`.measure`     measure: per-tensor norms, global across shards, unscaled under fp16
:mod:`.clipping`    clip: when the clipper runs (before or after the read), its statistics
:mod:`.hostread`    read: device values registered by name, read with one ``.tolist()``
:mod:`.decide`      decide: skip / warn / raise / stop, escalation, counters
:mod:`.step_report` report: :class:`StepReport`, the metric keys, the run summary
:mod:`.timesteps`   per-timestep gradient norms of recurrent modules
:mod:`.alerts`      alert: routing events to handlers, the logger, warnings and sinks
==================  ======================================================================

It imports torch only: no Lightning, TensorBoard or matplotlib (a test checks ``sys.modules``).
The detectors are :mod:`lightning_gradguard.detectors`, the clippers :mod:`lightning_gradguard.clip`.
"""

from lightning_gradguard.core.guard import METRIC_PREFIX, GroupBy, GuardCore, OnNonFinite, StepReport

__all__ = ["METRIC_PREFIX", "GroupBy", "GuardCore", "OnNonFinite", "StepReport"]
