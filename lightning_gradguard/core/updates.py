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

import torch
from torch import Tensor

from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.primitives.layout import OptimizerLayout
from lightning_gradguard.primitives.norms import combine_norms, grad_norms, group_norms

__all__ = ["UPDATE_KEYS", "UpdateTracker"]

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
