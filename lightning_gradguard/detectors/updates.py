"""What comes before a loss spike: an update spike, or an optimizer second moment collapsing.

:class:`UpdateDetector` looks at the logging steps of ``track_updates``:

* ``update_spike``: the total update-to-weight ratio ‖ΔW‖/‖W‖ is more than ``zscore`` standard
  deviations above the EMA of its own log (the guard's one spike rule, :mod:`.spike`, over logging
  steps, with a short warm-up);
* ``moment_collapse``: a layer's smallest √v (Adam's second moment) fell by at least ``decades``
  powers of ten below the EMA of its own log10, while the layer's gradient norm did not fall by as
  much: an ordinary gradient is about to become a huge update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.detectors.spike import HostSpikeStats
from lightning_gradguard.events import GradEvent

__all__ = ["UpdateDetector"]


class UpdateDetector:
    """``update_spike`` and ``moment_collapse`` events on logging steps with update statistics.

    Args:
        zscore: the z-score of log(update ratio) above which a logging step is an update spike.
        warmup: logging steps that only feed the statistics.
        decades: how many powers of ten a layer's smallest √v must fall (against its EMA) to collapse.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = UpdateDetector(6.0, warmup=3)
        >>> events = []
        >>> for s, ratio in enumerate([1e-3, 1.1e-3, 0.9e-3, 1e-3, 0.5]):
        ...     obs = Observation(s, 0, 1.0, True, False, logged=True)
        ...     obs.updates = {"total": ratio, "layers": {"fc": ratio}, "sqrt_v_min": {}}
        ...     events += det.detect(obs)
        >>> [(e.kind, e.step, e.origin) for e in events]
        [('update_spike', 4, 'fc')]
    """

    headline = False
    state_key = "updates"

    def __init__(self, zscore: float = 6.0, warmup: int = 5, decades: float = 2.0) -> None:
        self.zscore = zscore
        self.decades = decades
        self.stats = HostSpikeStats(warmup, new_level=0)
        self.log_v: dict[str, float] = {}  # each layer's EMA of log10(min √v)
        self.log_g: dict[str, float] = {}  # each layer's EMA of log10(gradient norm)

    def detect(self, obs: Observation) -> list[GradEvent]:
        updates = obs.updates
        if not obs.logged or not updates or not obs.finite:
            return []
        events = []
        ratios: Mapping[str, float] = updates.get("layers", {})
        total = float(updates.get("total", math.nan))
        z = self.stats.score(math.log(total) if math.isfinite(total) and total > 0 else math.nan)
        if z == z and z > self.zscore:
            top = sorted((n for n in ratios if math.isfinite(ratios[n])), key=lambda n: -ratios[n])[:3]
            events.append(GradEvent(
                "update_spike", step=obs.step, layers=tuple(top), origin=top[0] if top else None, value=z,
                optimizer_idx=obs.optimizer_idx,
                message=f"GradGuard: update spike at step {obs.step}: the update-to-weight ratio "
                f"{updates['total']:.3g} is {z:.1f} standard deviations above its recent values; largest: "
                + ", ".join(f"{n} ({ratios[n]:.3g})" for n in top) + ".",
                extra={"update_ratio": updates["total"]},
            ))  # fmt: skip
        collapsed = self._collapsed(updates.get("sqrt_v_min", {}), obs.layer_norms)
        if collapsed:
            names = tuple(sorted(collapsed))
            fell = max(collapsed.values())
            events.append(GradEvent(
                "moment_collapse", step=obs.step, layers=names, origin=names[0], value=fell,
                optimizer_idx=obs.optimizer_idx,
                message=f"GradGuard: the optimizer's second moment collapsed at step {obs.step} in "
                f"{', '.join(names)}: the smallest √v fell {fell:.1f} decades below its recent values while "
                "the gradient norm did not; the next ordinary gradient becomes a huge update (raise Adam's eps, "
                "or lower the learning rate).",
                extra={"decades": fell},
            ))  # fmt: skip
        return events

    def _collapsed(self, sqrt_v_min: Mapping[str, float], grads: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for name, v in sqrt_v_min.items():
            if not (math.isfinite(v) and v > 0):
                continue
            lv = math.log10(v)
            g = grads.get(name, math.nan)
            lg = math.log10(g) if math.isfinite(g) and g > 0 else None
            ev, eg = self.log_v.get(name), self.log_g.get(name)
            if ev is not None and ev - lv >= self.decades:
                grad_fell = 0.0 if lg is None or eg is None else eg - lg
                if grad_fell < self.decades / 2:
                    out[name] = ev - lv
                    continue  # a collapsed value does not enter the EMA
            self.log_v[name] = lv if ev is None else 0.8 * ev + 0.2 * lv
            if lg is not None:
                self.log_g[name] = lg if eg is None else 0.8 * eg + 0.2 * lg
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**self.stats.state_dict(), "log_v": dict(self.log_v), "log_g": dict(self.log_g)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)
        self.log_v = {str(k): float(v) for k, v in dict(state.get("log_v", {})).items()}
        self.log_g = {str(k): float(v) for k, v in dict(state.get("log_g", {})).items()}
