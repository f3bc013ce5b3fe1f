"""The guard's one spike statistic, on the device: the ``spike`` event, the ``skip_spikes`` skip and a
rollback's confirmed spike all read its z-score.

:class:`SpikeStatistic` keeps the rule of :mod:`lightning_gradguard.detectors.spike` (a Welford
warm-up, then an EMA of mean and variance with a floor on σ, and a restart after a run of flagged
steps) for two rows, log(total norm) and the loss, on 0-d device tensors. Each step it scores both
against the statistics from before it, and puts into the step's one read the norm's z-score (the
``spike`` event's) and the larger of the two (the skip's and the rollback's); with ``skip_spikes`` it
raises the skip flag ``spike_skip``, with a rollback on confirmed spikes the flag ``spike_high``. A
step that is non-finite, or skipped, on any rank never enters the statistics: so a skipped spike
leaves them as they were, and the decision is taken on the device with no host read (``found_inf``
for fused optimizers).

The loss row is scored only when a skip or a rollback reads it (``observe_loss`` each micro-batch;
its floor on σ is 1% of its mean's magnitude). Under data parallelism each rank scores its own loss:
the flags are summed across ranks, so the decision is shared, and each rank's z-score rides in the
same collective, so that the event reports the largest, the one that decided.

The statistics are float64 where the device has it (float32 on Apple's MPS).

When nothing on the device reads the statistic (no ``skip_spikes``, no rollback on confirmed spikes:
the ``spike`` event alone), the same rule runs on the host instead, on the total norm the step reads
anyway, after the read (a deferred step's, when it settles): no kernel at all on the step. A
checkpoint's and a snapshot's state is the same either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.detectors.spike import (
    ALPHA,
    FLOATS,
    MIN_STD,
    NEW_LEVEL,
    spike_restart,
    spike_score,
    spike_update,
)
from lightning_gradguard.events import GradEvent

__all__ = ["SpikeStatistic"]


class _Tensors:
    """The rule's operations on tensors."""

    where = staticmethod(torch.where)
    sqrt = staticmethod(torch.sqrt)
    maximum = staticmethod(torch.maximum)


_TORCH = _Tensors()
_TINY = torch.finfo(torch.float32).tiny  # the floor of the norm's log, as on the device


class SpikeStatistic(GuardComponent):
    """z-scores of [log(total norm), loss] against their own EMA, on the device (see the module).

    Args:
        warmup: finite steps that only feed the statistics (at least 2).
        event_zscore: the ``spike`` event's threshold (``spike_zscore``), or None.
        skip_zscore: skip a step above it (``skip_spikes``), or None.
        confirm_zscore: raise ``spike_high`` above it (a rollback's ``spike_zscore``), or None.
        new_level: flagged steps in a row after which the statistics restart (a new warm-up).

    Example::

        >>> import torch
        >>> stats = SpikeStatistic(warmup=3)
        >>> for norm in (1.0, 1.1, 0.9):
        ...     z = stats.score(torch.tensor(norm), None)
        ...     stats.feed(torch.tensor(norm), None, take=torch.tensor(True))
        >>> round(float(stats.score(torch.tensor(1000.0), None)[0]), 1)
        84.3
    """

    name = "spike"
    order = 20

    def __init__(self, warmup: int = 50, *, event_zscore: float | None = None, skip_zscore: float | None = None,
                 confirm_zscore: float | None = None, new_level: int = NEW_LEVEL) -> None:  # fmt: skip
        self.warmup = max(int(warmup), 2)
        self.event_zscore, self.skip_zscore, self.confirm_zscore = event_zscore, skip_zscore, confirm_zscore
        self.new_level = new_level
        self.loss_on = skip_zscore is not None or confirm_zscore is not None
        self.on_host = not self.loss_on  # no decision on the device reads it: the rule on host floats
        self.state: Tensor | None = None  # (2, 4): rows norm, loss; columns n, mean, m2, flagged in a row
        self._rows: list[list[float]] | None = None  # the same, on the host (on_host)
        self.rank, self.world_size = 0, 1
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._step: tuple[Tensor, Tensor, Tensor] | None = None  # this step's (x, ok, norm z)

    # ------------------------------------------------------------------ the rule, on tensors
    def _state(self, device: torch.device) -> Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        if self.state is None:
            self.state = torch.zeros(2, 4, dtype=dtype, device=device)
        elif self.state.device != device or self.state.dtype != dtype:
            self.state = self.state.to(device, dtype)
        return self.state

    def _values(self, total: Tensor, loss: Tensor | None) -> tuple[Tensor, Tensor]:
        state = self._state(total.device)
        total = total.detach().to(state.dtype).reshape(())
        norm_x = torch.log(total.clamp(min=_TINY))
        norm_ok = torch.isfinite(total) & (total > 0)
        if loss is None:
            loss_x, loss_ok = torch.zeros_like(norm_x), torch.zeros_like(norm_ok)
        else:
            loss_x = loss.detach().to(state.device, state.dtype).reshape(())
            loss_ok = torch.isfinite(loss_x)
        return torch.stack([norm_x, loss_x]), torch.stack([norm_ok, loss_ok])

    def score(self, total: Tensor, loss: Tensor | None) -> Tensor:
        """[z of log(total norm), z of the loss] against the statistics before this step; 0 while
        warming up and for a value that is non-finite or not observed. No host sync."""
        x, ok = self._values(total, loss)
        n, mean, m2, _ = self._state(total.device).unbind(1)
        floor = MIN_STD * torch.stack([torch.ones_like(mean[0]), mean[1].abs()]).clamp(min=1e-12)
        z: Tensor = spike_score(n, mean, m2, torch.where(ok, x, torch.zeros_like(x)), ok, warmup=self.warmup,
                                floor=floor, ops=_TORCH)  # fmt: skip
        return z.nan_to_num(0.0, 0.0, 0.0)

    def feed(self, total: Tensor, loss: Tensor | None, take: Tensor, spiked: Tensor | None = None) -> None:
        """Feed the step into the statistics where ``take`` (0-d bool: finite, not skipped); count
        ``spiked`` steps in a row (0-d bool), and restart after ``new_level`` of them."""
        x, ok = self._values(total, loss)
        state = self._state(total.device)
        n, mean, m2, run = state.unbind(1)
        x = torch.where(ok, x, torch.zeros_like(x))
        n, mean, m2 = spike_update(n, mean, m2, x, ok & take.to(ok.device).reshape(()), warmup=self.warmup,
                                   alpha=ALPHA, ops=_TORCH)  # fmt: skip
        state = torch.stack([n, mean, m2, run], dim=1)
        if spiked is not None:
            run, restart = spike_restart(run, spiked.to(state.device).reshape(()), new_level=self.new_level,
                                         ops=_TORCH)  # fmt: skip
            counted = torch.cat([state[:, :3], run[:, None]], 1)
            state = torch.where(restart.unsqueeze(1), torch.zeros_like(state), counted)
        self.state = state

    def _host_rows(self) -> list[list[float]]:
        """The statistics as host floats (a loaded or restored tensor is read once)."""
        if self._rows is None:
            self._rows = self.state.tolist() if self.state is not None else [[0.0] * 4, [0.0] * 4]
            self.state = None
        return self._rows

    def _host_step(self, total: float, healthy: bool) -> float:
        """``on_host``: the step's z-score of log(total norm), then the step fed into the statistics:
        ``score`` and ``feed`` on floats, as the device runs them (the loss row only counts the run)."""
        rows = self._host_rows()
        n, mean, m2, run = rows[0]
        ok = math.isfinite(total) and total > 0
        x = math.log(max(total, _TINY)) if ok else 0.0
        z = float(spike_score(n, mean, m2, x, ok, warmup=self.warmup, floor=MIN_STD, ops=FLOATS))
        spiked = self.event_zscore is not None and z > self.event_zscore
        rows[0][:3] = spike_update(n, mean, m2, x, ok and healthy and not spiked, warmup=self.warmup, alpha=ALPHA,
                                   ops=FLOATS)  # fmt: skip
        run, restart = spike_restart(run, spiked, new_level=self.new_level, ops=FLOATS)
        if restart:
            self._rows = [[0.0] * 4, [0.0] * 4]
        else:
            rows[0][3] = rows[1][3] = float(run)
        return z

    @property
    def stats(self) -> tuple[int, float, float]:
        """(finite steps seen, μ, σ) of log(total norm) (one host read); σ is NaN during the warm-up."""
        if self.state is None and self._rows is None:
            return 0, 0.0, float("nan")
        n, mean, m2, _ = self._rows[0] if self._rows is not None else self.state[0].tolist()  # type: ignore[index]
        return int(n), mean, float("nan") if n < self.warmup else max(m2, 0.0) ** 0.5

    # ------------------------------------------------------------------ the hooks
    def setup(self, setup: Setup) -> None:
        self.rank, self.world_size = setup.rank, setup.world_size

    def observe_loss(self, loss: Tensor) -> None:
        if self.loss_on:  # the loss's own statistics: the mean over micro-batches
            value = loss.detach().float().mean()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1

    def _take_loss(self) -> Tensor | None:
        total, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return None if total is None else total / count

    def gate(self, ctx: StepContext) -> str | None:
        ctx.extra["spike_loss"] = self._take_loss()  # a step skipped without a look consumes its loss
        return None

    def register(self, ctx: StepContext) -> None:
        if self.on_host:  # scored in observe, from the read
            return
        m = ctx.measurement
        assert m is not None
        loss = ctx.extra.get("spike_loss")
        z = self.score(m.total, loss)
        norm_z, both = z[0], z.max()
        ctx.read.put_each(("spike_norm_z", "spike_z"), torch.stack([norm_z, both]).to(m.zero.device, torch.float32))
        one, zero = torch.ones_like(m.zero), m.zero
        if self.skip_zscore is not None:
            ctx.flag("spike_skip", torch.where(both.to(m.zero.device) > self.skip_zscore, one, zero), skip=True,
                     reason="spike")  # fmt: skip
        if self.confirm_zscore is not None:
            ctx.flag("spike_high", torch.where(both.to(m.zero.device) > self.confirm_zscore, one, zero))
        if self.world_size > 1 and self.loss_on:  # each rank's own z (its own loss): the event's is the max
            mine = torch.zeros(self.world_size, dtype=torch.float32, device=m.zero.device)
            ctx.reduced("spike_z_ranks", mine.index_fill(0, torch.tensor([self.rank], device=mine.device),
                                                         both.to(mine.device, torch.float32)))  # fmt: skip
        self._step = (m.total, loss, norm_z)  # type: ignore[assignment]

    def flags_reduced(self, ctx: StepContext, flags: dict[str, Tensor]) -> None:
        if self.on_host:
            return
        assert self._step is not None
        total, loss, norm_z = self._step
        self._step = None
        # a spike, by any rank's flag or the event's threshold, is an outlier: it never enters the statistics
        spiked = (flags.get("spike_skip", torch.zeros(())) + flags.get("spike_high", torch.zeros(()))) > 0
        if self.event_zscore is not None:
            spiked = spiked.to(norm_z.device) | (norm_z > self.event_zscore)
        self.feed(total, loss, take=flags["healthy"] & ~spiked.to(flags["healthy"].device), spiked=spiked)

    def skip_event(self, ctx: StepContext, flag: str) -> GradEvent | None:
        if flag != "spike_skip":
            return None
        read = ctx.read
        z = max(read.vector("spike_z_ranks")) if "spike_z_ranks" in read else read["spike_z"]
        total, step = read["total"], ctx.number
        return GradEvent(
            "spike_skipped", step=step, value=total, optimizer_idx=ctx.optimizer_idx, action="skipped",
            message=f"GradGuard: skipped step {step}: its total norm {total:.4g} (or its loss) is {z:.1f} "
            "standard deviations above its rolling statistics (skip_spikes).",
            extra={"zscore": z},
        )  # fmt: skip

    def observe(self, ctx: StepContext, obs: Observation) -> None:
        obs.spike_z = self._host_step(obs.total, obs.finite) if self.on_host else ctx.read["spike_norm_z"]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain floats (one host read: checkpoints only)."""
        if self._rows is not None:
            return {"norm": list(self._rows[0]), "loss": list(self._rows[1])}
        if self.state is None:
            return {}
        norm, loss = self.state.tolist()
        return {"norm": norm, "loss": loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "norm" in state:
            rows = [list(state["norm"]), list(state.get("loss", [0.0] * 4))]
            self.state = torch.tensor([(row + [0.0] * 4)[:4] for row in rows], dtype=torch.float64)
            self._rows = None

    def load_legacy(self, state: dict[str, Any]) -> None:
        """A checkpoint of 0.2.x/0.3.x: the host statistic of the ``spike`` event (``spike``: n, mean,
        m2) becomes the norm row; the device statistics of ``skip_spikes`` (``spike_device``) give the
        loss row (and the norm row when the event's statistic was off)."""
        kept = state.get("spike_device")
        device = kept.get("device_stats") if isinstance(kept, dict) else None
        rows = [[0.0] * 4, [0.0] * 4]
        if device:
            rows = [(list(r) + [0.0] * 4)[:4] for r in device]
        host = state.get("spike")
        if isinstance(host, dict) and "n" in host:
            rows[0] = [float(host["n"]), float(host.get("mean", 0.0)), float(host.get("m2", 0.0)), rows[0][3]]
        if device or (isinstance(host, dict) and "n" in host):
            self.state = torch.tensor(rows, dtype=torch.float64)
            self._rows = None

    def snapshot_state(self) -> Any:
        if self._rows is not None:
            return [list(row) for row in self._rows]
        return None if self.state is None else self.state.clone()  # a device copy: no host read

    def load_snapshot_state(self, state: Any) -> None:
        if isinstance(state, list):
            self.state, self._rows = None, [list(row) for row in state]
        else:
            self.state, self._rows = (None if state is None else state.clone()), None
