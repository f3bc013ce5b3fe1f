"""Rolling statistics of the total norm and the loss, kept on the device: a spike is decided there.

:class:`DeviceSpikeStats` scores each step's log(total norm) and loss against an EMA of their recent
values, with the same rule as :class:`~lightning_gradguard.detectors.spike.LogNormStats` (a Welford
warm-up, then an EMA of mean and variance with a floor on σ), but on 0-d device tensors: the z-score
becomes a flag in the step's flags vector, so that a spike can be skipped exactly like a non-finite
step (``found_inf`` for fused optimizers) with no host read. A step that is skipped, flagged or
non-finite never enters the statistics. A "spike" that lasts ``new_level`` flagged steps in a row is
a new level, not a spike (a regime change, the end of a warm-up): the statistics start again from a
new warm-up, so that a run is never skipped forever against a past it has left behind.

The loss row is scored only when the loss was observed (``observe_loss``); its floor on σ is 1% of
its mean's magnitude. Under data parallelism each rank scores its own loss; the flags are summed
across ranks, so the decision is shared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceSpikeStats"]


class DeviceSpikeStats:
    """z-scores of [log(total norm), loss] against their own EMA, on the device.

    Args:
        warmup: finite steps that only feed the statistics (at least 2).
        alpha: the EMA's smoothing factor.
        min_std: the floor on σ: in log space for the norm, relative to |μ| for the loss.
        new_level: flagged steps in a row after which the statistics restart (a new warm-up).

    Example::

        >>> import torch
        >>> stats = DeviceSpikeStats(warmup=3)
        >>> for norm in (1.0, 1.1, 0.9):
        ...     z = stats.zscores(torch.tensor(norm), None)
        ...     stats.update(torch.tensor(norm), None, keep=torch.tensor(True))
        >>> round(float(stats.zscores(torch.tensor(1000.0), None)[0]), 1)
        84.3
    """

    def __init__(self, warmup: int = 50, alpha: float = 0.98, min_std: float = 0.01, new_level: int = 8) -> None:
        self.warmup = max(int(warmup), 2)
        self.alpha = alpha
        self.min_std = min_std
        self.new_level = new_level
        # (2, 4) float32: rows norm, loss; columns n, mean, m2, flagged steps in a row
        self.state: Tensor | None = None

    def _values(self, total: Tensor, loss: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        device = total.device
        if self.state is None or self.state.device != device:
            self.state = torch.zeros(2, 4, device=device) if self.state is None else self.state.to(device)
        total = total.detach().to(torch.float32).reshape(())
        norm_x = torch.log(total.clamp(min=torch.finfo(torch.float32).tiny))
        norm_ok = torch.isfinite(total) & (total > 0)
        if loss is None:
            loss_x, loss_ok = torch.zeros((), device=device), torch.zeros((), dtype=torch.bool, device=device)
        else:
            loss_x = loss.detach().to(device, torch.float32).reshape(())
            loss_ok = torch.isfinite(loss_x)
        return torch.stack([norm_x, loss_x]), torch.stack([norm_ok, loss_ok]), self.state

    def zscores(self, total: Tensor, loss: Tensor | None) -> Tensor:
        """[z of log(total norm), z of the loss] against the statistics before this step; 0 while
        warming up and for a value that is non-finite or not observed. No host sync."""
        x, ok, state = self._values(total, loss)
        n, mean, m2, _ = state.unbind(1)
        floor = self.min_std * torch.stack([torch.ones_like(mean[0]), mean[1].abs()]).clamp(min=1e-12)
        std = torch.maximum(m2.clamp(min=0).sqrt(), floor)
        z = (x - mean) / std
        return torch.where(ok & (n >= self.warmup), z, torch.zeros_like(z)).nan_to_num(0.0, 0.0, 0.0)

    def update(self, total: Tensor, loss: Tensor | None, keep: Tensor, spiked: Tensor | None = None) -> None:
        """Feed the step into the statistics if ``keep`` (0-d bool: not skipped, not flagged); count
        ``spiked`` steps in a row (0-d bool), and restart after ``new_level`` of them."""
        x, ok, state = self._values(total, loss)
        n, mean, m2, run = state.unbind(1)
        a = self.alpha
        n1 = n + 1
        delta = x - mean
        mean_w = mean + delta / n1
        m2_w = m2 + delta * (x - mean_w)
        m2_w = torch.where(n1 == self.warmup, m2_w / n1, m2_w)
        var = m2.clamp(min=0)
        mean_p = a * mean + (1 - a) * x
        m2_p = a * var + (1 - a) * (x - mean_p) ** 2
        warm = n < self.warmup
        new = torch.stack([n1, torch.where(warm, mean_w, mean_p), torch.where(warm, m2_w, m2_p), run], dim=1)
        take = (ok & keep.to(ok.device).reshape(())).unsqueeze(1)
        state = torch.where(take, new, state)
        if spiked is not None:
            hit = spiked.to(state.device).reshape(())
            run = torch.where(hit, state[:, 3] + 1, torch.zeros_like(state[:, 3]))
            restart = (run >= self.new_level).unsqueeze(1)  # a new level: a new warm-up
            state = torch.where(restart, torch.zeros_like(state), torch.cat([state[:, :3], run.unsqueeze(1)], 1))
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain floats (one host read: checkpoints only)."""
        return {"device_stats": self.state.tolist() if self.state is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = state.get("device_stats")
        loaded = torch.tensor(values, dtype=torch.float32) if values is not None else None
        if loaded is not None and loaded.shape[1] == 3:
            loaded = torch.cat([loaded, torch.zeros(2, 1)], 1)
        self.state = loaded

    def copy_state(self) -> Tensor | None:
        """A device copy of the statistics (for a snapshot; no host sync)."""
        return None if self.state is None else self.state.clone()

    def set_state(self, state: Tensor | None) -> None:
        self.state = None if state is None else state.clone()
