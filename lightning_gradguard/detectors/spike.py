"""Spikes: a value far above its own recent history, and the one rule that scores it.

The rule (:func:`spike_score`, :func:`spike_update`): the first ``warmup`` finite values only feed
the statistics (their exact mean and population variance, Welford); each later one is scored
against the statistics from *before* it, z = (x − μ) / max(σ, floor), and then, if it is kept,
updates them: μ ← αμ + (1−α)x, σ² ← ασ² + (1−α)(x − μ)² (with the updated μ). A value flagged as a
spike ``new_level`` times in a row is a new level, not a spike (a regime change): the statistics
start again from a new warm-up (:func:`spike_restart`).

It is written once, over numbers that may be Python floats or torch tensors (``ops`` supplies
``where``, ``sqrt`` and ``maximum``), so that every user of it applies the same arithmetic:

* the guard's device statistic of log(total norm) and of the loss
  (:class:`~lightning_gradguard.core.spike.SpikeStatistic`), from which the ``spike`` event, the
  ``skip_spikes`` skip and a rollback's confirmed spike all read one z-score;
* :func:`spike_zscores`, which replays it over a logged series for ``gradguard report`` (no torch);
* :class:`~lightning_gradguard.detectors.updates.UpdateDetector`, on the update-to-weight ratio.

:class:`SpikeDetector` turns the guard's z-score of a step into a ``spike`` event, naming the
layers that grew most against an EMA of their own log-norms (fed on logging steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = [
    "FLOATS", "HostSpikeStats", "SpikeDetector", "spike_restart", "spike_score", "spike_update", "spike_zscores",
]  # fmt: skip

ALPHA = 0.98  # the EMA's smoothing factor
MIN_STD = 0.01  # the floor on σ of log(total norm) (1%), relative to |μ| for the loss
NEW_LEVEL = 8  # flagged values in a row that make a new level


class _Floats:
    """The rule's operations on Python floats (``gradguard report`` imports no torch)."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def sqrt(x: Any) -> Any:
        return math.sqrt(x)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return max(a, b)


FLOATS = _Floats()


def spike_score(n: Any, mean: Any, m2: Any, x: Any, ok: Any, *, warmup: int, floor: Any, ops: Any) -> Any:
    """The z-score of ``x`` against the statistics (n, μ, m2) before it; 0 while warming up and for a
    value that is not ``ok`` (non-finite, or not observed)."""
    std = ops.maximum(ops.sqrt(ops.maximum(m2, 0.0 * m2)), floor)
    return ops.where(ok & (n >= warmup), (x - mean) / std, 0.0 * mean)


def spike_update(
    n: Any, mean: Any, m2: Any, x: Any, take: Any, *, warmup: int, alpha: float, ops: Any
) -> tuple[Any, Any, Any]:
    """The statistics after ``x`` when ``take`` (finite, and not left out: a skipped step), else as they were."""
    n1 = n + 1
    delta = x - mean
    mean_w = mean + delta / n1
    m2_w = m2 + delta * (x - mean_w)
    m2_w = ops.where(n1 == warmup, m2_w / n1, m2_w)
    var = ops.maximum(m2, 0.0 * m2)
    mean_p = alpha * mean + (1 - alpha) * x
    m2_p = alpha * var + (1 - alpha) * (x - mean_p) ** 2
    warm = n < warmup
    new_mean = ops.where(warm, mean_w, mean_p)
    new_m2 = ops.where(warm, m2_w, m2_p)
    return ops.where(take, n1, n), ops.where(take, new_mean, mean), ops.where(take, new_m2, m2)


def spike_restart(run: Any, spiked: Any, *, new_level: int, ops: Any) -> tuple[Any, Any]:
    """(flagged values in a row, whether the statistics restart now: a new level)."""
    run = ops.where(spiked, run + 1, 0.0 * run)
    return run, run >= new_level


class HostSpikeStats:
    """The rule on host floats, for one series (a logged one, or the update ratios of logging steps).

    Args:
        warmup: finite values that only feed the statistics (at least 2).
        alpha: the EMA's smoothing factor; ``min_std``: the floor on σ.
        new_level: flagged values in a row after which the statistics restart (0: never).
        threshold: the z-score that flags a value (for the restart rule; None: none is flagged).

    Example::

        >>> stats = HostSpikeStats(warmup=3)
        >>> [round(stats.score(x), 1) for x in (0.0, 0.0, 0.0, 3.0)]
        [nan, nan, nan, 300.0]
    """

    def __init__(self, warmup: int = 50, alpha: float = ALPHA, min_std: float = MIN_STD,
                 new_level: int = NEW_LEVEL, threshold: float | None = None) -> None:  # fmt: skip
        self.warmup = max(int(warmup), 2)
        self.alpha, self.min_std, self.new_level, self.threshold = alpha, min_std, new_level, threshold
        self.n, self.mean, self.m2, self.run = 0, 0.0, 0.0, 0

    def score(self, x: float) -> float:
        """The z-score of ``x`` (NaN while warming up, and for a non-finite value); then ``x`` feeds
        the statistics."""
        ok = math.isfinite(x)
        scored = ok and self.n >= self.warmup
        z = spike_score(self.n, self.mean, self.m2, x if ok else 0.0, ok, warmup=self.warmup, floor=self.min_std,
                        ops=FLOATS) if ok else 0.0  # fmt: skip
        self.n, self.mean, self.m2 = spike_update(self.n, self.mean, self.m2, x if ok else 0.0, ok,
                                                  warmup=self.warmup, alpha=self.alpha, ops=FLOATS)  # fmt: skip
        if self.new_level and self.threshold is not None and ok:
            self.run, restart = spike_restart(self.run, scored and z > self.threshold, new_level=self.new_level,
                                              ops=FLOATS)  # fmt: skip
            if restart:
                self.n, self.mean, self.m2, self.run = 0, 0.0, 0.0, 0
        return z if scored else math.nan

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n": self.n, "mean": self.mean, "m2": self.m2}
        return {**state, "run": self.run} if self.new_level else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.mean = int(state.get("n", 0)), float(state.get("mean", 0.0))
        self.m2, self.run = float(state.get("m2", 0.0)), int(state.get("run", 0))


def spike_zscores(totals: Iterable[float], warmup: int = 50, zscore: float | None = None) -> list[float]:
    """The z-score the guard gives each total norm of a series (of log(total norm)), in order: NaN
    while warming up, and for non-finite norms. ``zscore``: the threshold whose flags restart the
    statistics after :data:`NEW_LEVEL` in a row, as the live guard does.

    Example::

        >>> [round(z, 1) for z in spike_zscores([1.0, 1.0, 1.0, 20.0], warmup=3)]
        [nan, nan, nan, 299.6]
    """
    stats = HostSpikeStats(warmup, threshold=zscore)
    return [stats.score(math.log(t)) if math.isfinite(t) and t > 0 else stats.score(math.nan) for t in totals]


class SpikeDetector:
    """A ``spike`` event when a finite step's z-score of log(total norm) exceeds ``zscore``.

    The z-score is the guard's own (``obs.spike_z``, from its device statistic: the same one that
    ``skip_spikes`` and a rollback's spike trigger read). An EMA of each layer's log-norm, fed on
    logging steps, names the layers that grew most; a spike costs one more host read for them.

    Args:
        zscore: the z-score above which a step is a spike, ``>= 0``.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = SpikeDetector(3.0)
        >>> obs = Observation(4, 0, 50.0, True, False, layers_now=lambda: {"fc": 50.0})
        >>> obs.spike_z = 8.2
        >>> [(e.kind, e.origin, e.value) for e in det.detect(obs)]
        [('spike', 'fc', 8.2)]
    """

    headline = True
    state_key = "spike"

    def __init__(self, zscore: float) -> None:
        self.zscore = zscore
        self.log_ema: dict[str, float] = {}  # each layer's EMA of log-norm (logging steps)

    def detect(self, obs: Observation) -> list[GradEvent]:
        events = self._score(obs) if obs.finite else []
        if obs.logged and not obs.nonfinite:
            self._track_layers(obs.layer_norms)
        return events

    def _score(self, obs: Observation) -> list[GradEvent]:
        z = obs.spike_z
        if not (z == z and z > self.zscore):
            return []
        top = self.grew_most(obs.layers_now())
        step, total = obs.step, obs.total
        return [
            GradEvent(
                "spike",
                step=step,
                layers=tuple(top),
                origin=top[0] if top else None,
                value=z,
                message=f"GradGuard: gradient spike at step {step}: total norm {total:.4g} is {z:.1f} standard "
                f"deviations above its recent log-norm; grew most: {', '.join(top)}.",
                optimizer_idx=obs.optimizer_idx,
                extra={"total_norm": total},
            )
        ]

    def _track_layers(self, norms: Mapping[str, float]) -> None:
        for name, v in norms.items():
            if math.isfinite(v) and v > 0:
                x = math.log(v)
                self.log_ema[name] = x if name not in self.log_ema else 0.9 * self.log_ema[name] + 0.1 * x

    def grew_most(self, norms: Mapping[str, float], k: int = 3) -> list[str]:
        """The ``k`` layers whose norm grew most against their own EMA (or the largest, without one)."""

        def growth(item: tuple[str, float]) -> float:
            name, v = item
            if not math.isfinite(v) or v <= 0:
                return math.inf if not math.isfinite(v) else -math.inf
            return math.log(v) - self.log_ema.get(name, 0.0)

        ranked = sorted(norms.items(), key=growth, reverse=True)
        return [name for name, _ in ranked[:k]]

    def state_dict(self) -> dict[str, Any]:
        return {"log_ema": dict(self.log_ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_ema = {str(k): float(v) for k, v in dict(state.get("log_ema", {})).items()}
