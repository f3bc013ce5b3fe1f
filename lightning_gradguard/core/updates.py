"""The updates and the optimizer's state, per layer, on logging steps (``track_updates=True``).

What came before a spike is often an *update* spike: with Adam, a second moment that has collapsed
towards zero turns an ordinary gradient into a huge step. On each logging step N this measures, per
layer:

* ``‖W‖``, the weight norm, and ``‖ΔW‖ / ‖W‖``, the update-to-weight ratio of the update that led
  into step N (the update of step N - 1: the weights are copied at step N - 1, before its update,
  and compared at step N);
* for Adam-family optimizers (a state with ``exp_avg_sq``), the smallest and the median √v of the
  layer, v being the optimizer's own ``exp_avg_sq``.

Everything is computed on the device (``_foreach`` norms, one scatter per quantity, a loop over
layers for the median only) and read with the logging step's one host read. Non-logging steps pay
nothing, except the step before a logging step: one copy of the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.detectors.base import Detector, Observation
from lightning_gradguard.detectors.updates import UpdateDetector
from lightning_gradguard.primitives.keys import METRIC_PREFIX
from lightning_gradguard.primitives.layout import OptimizerLayout
from lightning_gradguard.primitives.norms import combine_norms, dtensor_type, grad_norms, group_norms

__all__ = ["UPDATE_KEYS", "UpdateTracker", "UpdateTracking"]

UPDATE_KEYS = ("update_ratio", "weight_norm", "sqrt_v_min", "sqrt_v_median")  # per-layer metric names


class UpdateTracker:
    """Copies the weights before the update that precedes a logging step, and measures it there.

    Example::

        >>> import torch
        >>> from lightning_gradguard.primitives.layout import LayerMap
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))  # one layer, "0": weight and bias
        >>> layers = LayerMap(); layers.watch(model)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> tracker = UpdateTracker()
        >>> for p in model.parameters(): p.grad = torch.ones_like(p)
        >>> tracker.keep_before(opt, layers.layout(opt))
        >>> opt.step()
        >>> read = HostRead(); ids = tracker.register(read, opt, layers.layout(opt)); read.read()
        >>> round(read.vector("update_ratio")[0] * read.vector("weight_norm")[0], 4)  # ‖ΔW‖ = 0.1·‖1‖
        0.1732
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type
        self._before: dict[int, list[Tensor]] = {}

    def keep_before(self, optimizer: torch.optim.Optimizer, layout: OptimizerLayout) -> None:
        """Copy the weights before this step's update (the next step logs)."""
        self._before[id(optimizer)] = [p.detach().clone() for p in layout.params]

    def discard(self) -> None:
        self._before.clear()

    def register(self, read: HostRead, optimizer: torch.optim.Optimizer, layout: OptimizerLayout) -> list[int]:
        """Put the per-layer quantities into the step's read; the layer ids they are for ([] when the
        weights before the last update were not kept)."""
        before = self._before.pop(id(optimizer), None)
        params = [p.detach() for p in layout.params]
        if before is None or len(before) != len(params) or not params:
            return []
        device = params[0].device
        owners = list(range(len(params)))
        index, present, select = layout.index(owners, device)
        count, p = len(layout.layer_names), self.norm_type
        diffs = torch._foreach_sub(params, before)
        upd = grad_norms(diffs, p).to(device)
        weights = grad_norms(params, p).to(device)
        w_layer = group_norms(weights, index, count, p).index_select(0, select)
        u_layer = group_norms(upd, index, count, p).index_select(0, select)
        read.put("update_ratio", u_layer / w_layer)
        read.put("weight_norm", w_layer)
        read.put_each(("update_total",), torch.stack([combine_norms(upd, p) / combine_norms(weights, p)]))
        moments = [optimizer.state.get(param, {}).get("exp_avg_sq") for param in layout.params]
        if any(isinstance(v, Tensor) for v in moments):
            vmin, vmed = _sqrt_v(moments, layout, present, device)
            read.put("sqrt_v_min", vmin)
            read.put("sqrt_v_median", vmed)
        return present


def _sqrt_v(
    moments: Sequence[Tensor | None], layout: OptimizerLayout, present: Sequence[int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Each present layer's smallest and median √v (NaN for a layer without a second moment)."""
    by_layer: dict[int, list[Tensor]] = {}
    for i, v in enumerate(moments):
        if isinstance(v, Tensor) and v.numel():
            by_layer.setdefault(layout.param_layer[i], []).append(v.detach().flatten())
    nan = torch.full((), float("nan"), device=device)
    mins, meds = [], []
    for layer in present:  # logging steps only: a loop over layers, for the median
        parts = by_layer.get(layer)
        if not parts:
            mins.append(nan)
            meds.append(nan)
            continue
        root = torch.cat(parts).float().sqrt()
        mins.append(root.min().to(device))
        meds.append(root.median().to(device))
    return torch.stack(mins), torch.stack(meds)


class UpdateTracking(GuardComponent):
    """``track_updates=True``: the :class:`UpdateTracker` and its detector, as the guard's ``updates``
    component. On a logging step its values ride in the step's one read; the step before one copies
    the weights. ``gradguard/update_ratio`` (the total) and ``gradguard/<key>/<layer>`` for each of
    :data:`UPDATE_KEYS` are logged; ``update_spike`` and ``moment_collapse`` events detected.

    Args:
        norm_type: the order of the norms.
        zscore: the ``update_spike`` threshold (the guard's ``spike_zscore``, 6.0 when that is off).

    Raises:
        ValueError: at :meth:`setup`, on sharded parameters (FSDP, tensor parallel), which the norms
            of updates and weights would need reduced.
    """

    name = "updates"
    order = 40

    def __init__(self, norm_type: float = 2.0, zscore: float = 6.0) -> None:
        self.tracker = UpdateTracker(norm_type)
        self.detector = UpdateDetector(zscore)

    def setup(self, setup: Setup) -> None:
        dtensor = dtensor_type()
        model = setup.model
        if setup.sharded or (
            model is not None and dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())
        ):
            raise ValueError(
                "GradGuard: track_updates=True does not support sharded parameters yet (FSDP, tensor parallel): "
                "the update and weight norms would need the shards reduced. Use it under DDP or on one process."
            )

    def detectors(self) -> list[Detector]:
        return [self.detector]

    def register(self, ctx: StepContext) -> None:
        if ctx.logging:  # the update that led into this step, then (below) the weights before this one
            ctx.extra["update_ids"] = self.tracker.register(ctx.read, ctx.optimizer, ctx.layout)
        if ctx.log_next:
            self.tracker.keep_before(ctx.optimizer, ctx.layout)  # measured at the next (logging) step

    def report(self, ctx: StepContext) -> None:
        ids = ctx.extra.get("update_ids")
        if not ids or ctx.report is None:
            return
        read, metrics, p = ctx.read, ctx.report.metrics, METRIC_PREFIX
        names = [ctx.layout.layer_names[i] for i in ids]
        metrics[f"{p}update_ratio"] = read["update_total"]
        for key in UPDATE_KEYS:
            if key in read:
                metrics.update({f"{p}{key}/{n}": v for n, v in zip(names, read.vector(key), strict=True)})

    def observe(self, ctx: StepContext, obs: Observation) -> None:
        ids = ctx.extra.get("update_ids")
        if not ids or not obs.logged:
            return
        read = ctx.read
        measured = [ctx.layout.layer_names[i] for i in ids]
        obs.updates = {
            "total": read["update_total"],
            "layers": dict(zip(measured, read.vector("update_ratio"), strict=True)),
            "sqrt_v_min": dict(zip(measured, read.vector("sqrt_v_min"), strict=True)) if "sqrt_v_min" in read else {},
        }

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)

    def load_legacy(self, state: dict[str, Any]) -> None:
        if "updates" in state:  # 0.3.0 kept the detector's state at the top level
            self.detector.load_state_dict(state["updates"])
