"""Gradient spikes: a total norm far above its own recent history.

:class:`SpikeDetector` owns its statistics: :class:`LogNormStats` (an EMA of log(total norm), with
a warm-up) scores each finite step, and an EMA of each layer's log-norm, fed on logging steps, names
the layers that grew most against their own recent norms. :func:`spike_zscores` replays the same
rule over a logged series (``gradguard report`` uses it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["LogNormStats", "SpikeDetector", "spike_zscores"]


class SpikeDetector:
    """A ``spike`` event when a finite step's z-score of log(total norm) exceeds ``zscore``.

    Every finite step feeds the statistics; a spike costs one more host read, for the per-layer
    norms that say where it is.

    Args:
        zscore: the z-score above which a step is a spike, ``>= 0``.
        warmup: finite steps that only feed the statistics.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = SpikeDetector(3.0, warmup=3)
        >>> for s, total in enumerate([1.0, 1.1, 0.9, 50.0]):
        ...     events = det.detect(Observation(s, 0, total, True, False, layers_now=lambda: {"fc": total}))
        >>> [(e.kind, e.origin) for e in events]
        [('spike', 'fc')]
    """

    headline = True
    state_key = "spike"

    def __init__(self, zscore: float, warmup: int = 50) -> None:
        self.zscore = zscore
        self.stats = LogNormStats(warmup)
        self.log_ema: dict[str, float] = {}  # each layer's EMA of log-norm (logging steps)

    def detect(self, obs: Observation) -> list[GradEvent]:
        events = self._score(obs) if obs.finite else []
        if obs.logged and not obs.nonfinite:
            self._track_layers(obs.layer_norms)
        return events

    def _score(self, obs: Observation) -> list[GradEvent]:
        z = self.stats.score(obs.total)
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
        return {**self.stats.state_dict(), "log_ema": dict(self.log_ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state)
        self.log_ema = {str(k): float(v) for k, v in dict(state.get("log_ema", {})).items()}


def spike_zscores(totals: Iterable[float], warmup: int = 50) -> list[float]:
    """The z-score :class:`SpikeDetector` gives each total norm of a series, in order (NaN while
    warming up, and for non-finite norms).

    Example::

        >>> [round(z, 1) for z in spike_zscores([1.0, 1.0, 1.0, 20.0], warmup=3)]
        [nan, nan, nan, 299.6]
    """
    stats = LogNormStats(warmup)
    return [stats.score(t) for t in totals]


class LogNormStats:
    """One-sided z-scores of log(total norm) against an EMA of its mean and variance.

    The first ``warmup`` finite steps only feed the statistics (their exact mean and population
    variance). Each later finite step is scored against the statistics from *before* it,
    z = (log‖g‖ − μ) / max(σ, ``min_std``), and only then updates them:
    μ ← αμ + (1−α)x, σ² ← ασ² + (1−α)(x − μ)² (with the updated μ). Non-finite (and zero) norms
    never enter the statistics; their z-score is NaN. ``min_std`` (0.01 in log space, i.e. 1%)
    keeps a perfectly steady run from calling every wobble a spike.

    It works on host floats: the guard reads the total norm with the step's one host sync anyway,
    so the statistics cost no kernels and no extra sync.

    Args:
        warmup: finite steps that only feed the statistics, an int >= 0.
        alpha: the EMA's smoothing factor, in (0, 1).
        min_std: the floor on σ, in log space.

    Example::

        >>> det = LogNormStats(warmup=3)
        >>> [round(det.score(n), 1) for n in (1.0, 1.0, 1.0, 20.0)]
        [nan, nan, nan, 299.6]
    """

    def __init__(self, warmup: int = 50, alpha: float = 0.98, min_std: float = 0.01) -> None:
        self.warmup = warmup
        self.alpha = alpha
        self.min_std = min_std
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0  # warm-up: sum of squared deviations; after it: the variance

    def score(self, total: float) -> float:
        """The z-score of this step (NaN during warm-up and for non-finite norms); updates the statistics."""
        if not (math.isfinite(total) and total > 0):
            return math.nan
        x = math.log(total)
        if self.n < self.warmup:  # Welford: exact mean and population variance
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)
            if self.n == self.warmup:
                self.m2 /= self.n
            return math.nan
        var = max(self.m2, 0.0)
        z = (x - self.mean) / max(math.sqrt(var), self.min_std)
        self.n += 1
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.m2 = self.alpha * var + (1 - self.alpha) * (x - self.mean) ** 2
        return z

    @property
    def stats(self) -> tuple[int, float, float]:
        """(finite steps seen, μ, σ) of log(total norm); σ is NaN during the warm-up."""
        if self.n < self.warmup:
            return self.n, self.mean, math.nan
        return self.n, self.mean, math.sqrt(max(self.m2, 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state.get("n", 0))
        self.mean = float(state.get("mean", 0.0))
        self.m2 = float(state.get("m2", 0.0))
