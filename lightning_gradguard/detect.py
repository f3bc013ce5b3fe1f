"""Detecting non-finite gradients and naming where they began.

Healthy steps cost one ``isfinite`` on the total norm (already on the device). Only on a faulty step
does the guard look at each tensor's norm, to list the layers with non-finite gradients and find the
*origin*: the non-finite layer that runs first in the backward pass, that is the last one in the
recorded forward order. Backpropagation carries a NaN from that layer to every layer before it, so
the origin is where the fault entered the gradient. A non-finite loss is reported as origin
``"loss"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["LayerWatch", "SpikeDetector", "describe_nonfinite", "nonfinite_tensors", "origin_of"]


def nonfinite_tensors(norms: Tensor) -> list[int]:
    """Indices of the tensors whose norm is NaN or Inf (one host sync: fault path only).

    Args:
        norms: 1-D per-tensor norms.

    Raises:
        RuntimeError: never for a 1-D tensor; documented for completeness.

    Example::

        >>> import torch
        >>> nonfinite_tensors(torch.tensor([1.0, float("nan"), 2.0, float("inf")]))
        [1, 3]
    """
    return [int(i) for i in (~torch.isfinite(norms)).nonzero().flatten().tolist()]


def origin_of(layers_in_forward_order: Sequence[str], loss_nonfinite: bool) -> str | None:
    """The origin of a non-finite step.

    Args:
        layers_in_forward_order: the layers with non-finite gradients, in forward order.
        loss_nonfinite: whether the loss itself was non-finite.

    Raises:
        Nothing: an empty list gives None.

    Example::

        >>> origin_of(["embed", "rnn.l0", "head"], loss_nonfinite=False)
        'head'
        >>> origin_of(["embed", "head"], loss_nonfinite=True)
        'loss'
        >>> origin_of([], loss_nonfinite=False) is None
        True
    """
    if loss_nonfinite:
        return "loss"
    return layers_in_forward_order[-1] if layers_in_forward_order else None


def describe_nonfinite(
    step: int, layers: Sequence[str], origin: str | None, total: float, action: str, optimizer_idx: int = 0
) -> str:
    """A one-line message for a non-finite step.

    Example::

        >>> describe_nonfinite(4, ["a", "b"], "b", float("nan"), "skipped")
        "GradGuard: non-finite gradient at step 4 (total norm nan), origin 'b'; layers: a, b. Step skipped."
    """
    opt = f" of optimizer {optimizer_idx}" if optimizer_idx else ""
    where = f"origin '{origin}'" if origin else "origin unknown"
    shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
    listed = f"; layers: {shown}" if layers else ""
    verdict = {
        "skipped": "Step skipped.",
        "stopped": "Step skipped; stopping training.",
        "raised": "Raising.",
        "warned": "Step NOT skipped (on_nonfinite='warn').",
        "skipped by the GradScaler": "Step skipped by the GradScaler.",
    }.get(action, "")
    head = f"GradGuard: non-finite gradient at step {step}{opt} (total norm {total:g})"
    return f"{head}, {where}{listed}. {verdict}".strip()


class SpikeDetector:
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

        >>> det = SpikeDetector(warmup=3)
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


class LayerWatch:
    """Per-layer checks on logging steps: vanishing (with patience), dead and unused layers.

    * A layer whose norm is below ``vanish_threshold``, or whose ‖g‖/‖w‖ is below ``vanish_ratio``,
      on ``patience`` consecutive logging steps is *vanishing* (reported once, when it gets there;
      again only after it recovered). Exactly-zero gradients are *dead* instead.
    * A layer whose gradients are exactly zero is *dead*; a layer whose parameters require grad but
      got no gradient is *unused*. Each is reported once per layer.
    * It keeps an EMA of each layer's log-norm, so that a spike can name the layers that grew most
      against their own recent norms.

    Example::

        >>> w = LayerWatch(vanish_threshold=1e-8, vanish_ratio=None, patience=2)
        >>> w.update({"a": 1.0, "b": 1e-12}, {}), w.update({"a": 1.0, "b": 1e-12}, {})
        (([], [], []), (['b'], [], []))
    """

    def __init__(self, vanish_threshold: float = 1e-8, vanish_ratio: float | None = None, patience: int = 3) -> None:
        self.vanish_threshold = vanish_threshold
        self.vanish_ratio = vanish_ratio
        self.patience = patience
        self.below: dict[str, int] = {}
        self.reported_dead: set[str] = set()
        self.reported_unused: set[str] = set()
        self.log_ema: dict[str, float] = {}

    def update(
        self, norms: Mapping[str, float], weight_norms: Mapping[str, float], unused: Sequence[str] = ()
    ) -> tuple[list[str], list[str], list[str]]:
        """Feed one logging step's per-layer norms; return (newly vanishing, newly dead, newly unused)."""
        vanishing, dead = [], []
        for name, v in norms.items():
            if not math.isfinite(v):
                continue
            if v == 0.0:
                self.below.pop(name, None)
                if name not in self.reported_dead:
                    self.reported_dead.add(name)
                    dead.append(name)
                continue
            w = weight_norms.get(name)
            low = v < self.vanish_threshold or (
                self.vanish_ratio is not None and w is not None and w > 0 and v / w < self.vanish_ratio
            )
            if low:
                self.below[name] = self.below.get(name, 0) + 1
                if self.below[name] == self.patience:
                    vanishing.append(name)
            else:
                self.below.pop(name, None)
            x = math.log(v)
            self.log_ema[name] = x if name not in self.log_ema else 0.9 * self.log_ema[name] + 0.1 * x
        fresh_unused = [n for n in unused if n not in self.reported_unused]
        self.reported_unused.update(fresh_unused)
        return vanishing, dead, fresh_unused

    def grew_most(self, norms: dict[str, float], k: int = 3) -> list[str]:
        """The ``k`` layers whose norm grew most against their own EMA (or the largest, without one)."""

        def growth(item: tuple[str, float]) -> float:
            name, v = item
            if not math.isfinite(v) or v <= 0:
                return math.inf if not math.isfinite(v) else -math.inf
            return math.log(v) - self.log_ema.get(name, 0.0)

        ranked = sorted(norms.items(), key=growth, reverse=True)
        return [name for name, _ in ranked[:k]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "below": dict(self.below),
            "dead": sorted(self.reported_dead),
            "unused": sorted(self.reported_unused),
            "log_ema": dict(self.log_ema),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.below = {str(k): int(v) for k, v in dict(state.get("below", {})).items()}
        self.reported_dead = set(state.get("dead", []))
        self.reported_unused = set(state.get("unused", []))
        self.log_ema = {str(k): float(v) for k, v in dict(state.get("log_ema", {})).items()}
