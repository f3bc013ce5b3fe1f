"""Per-timestep gradient norms: how much gradient from the loss reaches each earlier timestep.

This is the long-term-dependency problem made visible (Bengio, Simard and Frasconi, 1994; Pascanu,
Mikolov and Bengio, 2013): the gradient reaching step t of a recurrent network is a product of
Jacobians over the later steps, so it shrinks (vanishes) or grows (explodes) geometrically with the
distance to the loss.

What is tracked, automatically:

* every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: ‖∂L/∂x_t‖ for each timestep t of its input (dense with
  ``batch_first`` either way, unbatched, or a ``PackedSequence``, where step t counts only the
  sequences that have a step t);
* every ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``: ‖∂L/∂h_t‖ of each call's hidden output, t
  being the call index within the forward pass;
* any tensor passed through :func:`track_timesteps`.

Each norm is the ``norm_type`` norm over batch and features at that step. Micro-batches of one
optimizer step combine as if they were one batch (p-th powers add up; for ``inf`` the max is kept).

How it stays free and harmless: hooks are attached only while the tracker is *armed*, that is on
forward passes that belong to a logging step. The captured tensor is an alias (``view_as``) of the
module's input, or for an input that does not require grad a detached copy that does: the user's
tensors and every gradient they receive are unchanged. Each capture costs one reduction on the
device when its gradient arrives; nothing is copied to the host until the guard's logging step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.core.step_report import timestep_metrics
from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.errors import warn
from lightning_gradguard.primitives.layout import strip_wrappers as _strip_wrappers
from lightning_gradguard.primitives.text import unmatched

__all__ = [
    "TimestepHistory",
    "TimestepTracker",
    "TimestepTracking",
    "combine_profiles",
    "make_tracker",
    "summarize_profile",
    "track_timesteps",
]

_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
_ACTIVE: TimestepTracker | None = None


def track_timesteps(tensor: Tensor, name: str, time_dim: int = 1) -> Tensor:
    """Track per-position gradient norms of any sequence tensor; returns ``tensor`` unchanged.

    Use it on a custom RNN's hidden states or a Transformer's positions. When no guard is armed (no
    guard at all, or not a logging step) it returns ``tensor`` itself and costs nothing.

    Args:
        tensor: a tensor with a time (or position) dimension, part of the autograd graph.
        name: the name under which the profile is logged (``gradguard/timestep/<name>/...``).
        time_dim: which dimension is time.

    Raises:
        ValueError: from ``Tensor.size`` when ``time_dim`` is out of range for an active guard.

    Example::

        >>> import torch
        >>> h = torch.randn(4, 10, 8, requires_grad=True)
        >>> track_timesteps(h, "states") is h   # no guard armed: a no-op
        True
    """
    tracker = _ACTIVE
    if tracker is None or not tracker.armed or not tensor.requires_grad:
        return tensor
    return tracker.capture(tensor, name, time_dim)


def _per_step_power(grad: Tensor, time_dim: int, p: float) -> Tensor:
    g = grad.detach().movedim(time_dim, 0).reshape(grad.shape[time_dim], -1)
    if math.isinf(p):
        return g.abs().amax(dim=1).float()
    return g.abs().float().pow(p).sum(dim=1) if p != 2 else g.float().square().sum(dim=1)


def _packed_power(grad: Tensor, batch_sizes: Tensor, p: float) -> Tensor:
    steps = torch.repeat_interleave(  # output_size given: no host sync to size the result
        torch.arange(len(batch_sizes), device=grad.device), batch_sizes.to(grad.device), output_size=grad.shape[0]
    )
    rows = grad.detach().reshape(grad.shape[0], -1).float()
    out = torch.zeros(len(batch_sizes), device=grad.device)
    if math.isinf(p):
        return out.scatter_reduce(0, steps, rows.abs().amax(dim=1), reduce="amax")
    return out.index_add(0, steps, rows.abs().pow(p).sum(dim=1))


class TimestepTracker:
    """Collects per-timestep gradient norms of recurrent modules and tracked tensors.

    Args:
        norm_type: the norm's order.
        modules: True to track every recurrent module and cell, or a list of module names to
            restrict tracking to.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> rnn = nn.RNN(3, 5, batch_first=True)
        >>> tracker = TimestepTracker()
        >>> tracker.watch(rnn)
        ['rnn']
        >>> tracker.arm()
        >>> out, _ = rnn(torch.randn(2, 7, 3))
        >>> out[:, -1].sum().backward()
        >>> profile = tracker.collect()["rnn"]
        >>> profile.shape
        torch.Size([7])
    """

    def __init__(self, norm_type: float = 2.0, modules: bool | Iterable[str] = True) -> None:
        self.norm_type = norm_type
        self.only: set[str] | None = None if modules is True else set(modules)  # type: ignore[arg-type]
        self.armed = False
        self._sums: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self.tracked: list[str] = []
        self.recurrent: list[str] = []  # every recurrent module of the watched model, tracked or not

    # ------------------------------------------------------------- modules
    def watch(self, model: nn.Module) -> list[str]:
        """Attach the (dormant) forward hooks to every recurrent module of ``model``; returns their names."""
        global _ACTIVE
        self.unwatch()
        _ACTIVE = self
        self.recurrent = []
        for qualified, module in model.named_modules():
            qualified = _strip_wrappers(qualified)
            name = qualified or type(module).__name__.lower()
            if isinstance(module, (nn.RNNBase, *_CELLS)):
                self.recurrent.append(name)
            if self.only is not None and name not in self.only:
                continue
            if isinstance(module, nn.RNNBase):
                self._handles.append(module.register_forward_pre_hook(self._rnn_hook(name, module)))
                self.tracked.append(name)
            elif isinstance(module, _CELLS):
                self._handles.append(module.register_forward_hook(self._cell_hook(name)))
                self.tracked.append(name)
        return list(self.tracked)

    def unwatch(self) -> None:
        """Remove every hook and stop being the active tracker."""
        global _ACTIVE
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.tracked.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    def _rnn_hook(self, name: str, module: nn.RNNBase) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self.armed or not args:
                return None
            x = args[0]
            if isinstance(x, PackedSequence):
                data = self._alias(x.data, name, None, x.batch_sizes)
                packed = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                return (packed, *args[1:])
            if not isinstance(x, Tensor) or not x.is_floating_point():
                return None
            time_dim = 0 if x.dim() == 2 or not module.batch_first else 1
            return (self._alias(x, name, time_dim, None), *args[1:])

        return hook

    def _cell_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if not self.armed:
                return None
            t = self._calls.get(name, 0)
            self._calls[name] = t + 1
            h = output[0] if isinstance(output, tuple) else output
            if not isinstance(h, Tensor) or not h.requires_grad:
                return None
            h = h.view_as(h)
            h.register_hook(self._cell_grad(name, t))  # type: ignore[no-untyped-call]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    # ------------------------------------------------------------- capture
    def capture(self, tensor: Tensor, name: str, time_dim: int) -> Tensor:
        """Alias ``tensor`` and record its per-step gradient norms under ``name``."""
        return self._alias(tensor, name, time_dim % max(tensor.dim(), 1), None)

    def _alias(self, x: Tensor, name: str, time_dim: int | None, batch_sizes: Tensor | None) -> Tensor:
        # An alias keeps the graph (and every upstream gradient) intact; an input that does not
        # require grad gets a detached copy that does, so that its gradient exists at all.
        alias = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        p = self.norm_type

        def on_grad(grad: Tensor) -> None:
            if batch_sizes is not None:
                self._add(name, _packed_power(grad, batch_sizes, p))
            else:
                self._add(name, _per_step_power(grad, time_dim or 0, p))

        alias.register_hook(on_grad)  # type: ignore[no-untyped-call]
        return alias

    def _cell_grad(self, name: str, t: int) -> Any:
        p = self.norm_type

        def on_grad(grad: Tensor) -> None:
            power = _per_step_power(grad.unsqueeze(0), 0, p)
            self._add(name, power, offset=t)

        return on_grad

    def _add(self, name: str, power: Tensor, offset: int = 0) -> None:
        need = offset + power.shape[0]
        acc = self._sums.get(name)
        if acc is None:
            acc = torch.zeros(need, device=power.device)
        elif acc.shape[0] < need:
            acc = torch.cat([acc, acc.new_zeros(need - acc.shape[0])])
        piece = acc[offset:need]
        if math.isinf(self.norm_type):
            acc[offset:need] = torch.maximum(piece, power.to(acc.device))
        else:
            acc[offset:need] = piece + power.to(acc.device)
        self._sums[name] = acc

    # --------------------------------------------------------------- steps
    def arm(self) -> None:
        """Start capturing: forward passes from now on until :meth:`collect` are tracked."""
        self.armed = True
        self._calls.clear()

    def new_forward(self) -> None:
        """Reset the cell call index (a new micro-batch's forward pass begins)."""
        self._calls.clear()

    def disarm(self) -> None:
        """Stop capturing and drop whatever was collected."""
        self.armed = False
        self._sums.clear()
        self._calls.clear()

    def collect(self, scale: Tensor | None = None) -> dict[str, Tensor]:
        """Finish the step: per-timestep norms (device tensors), divided by ``scale`` if given; disarms."""
        p = self.norm_type
        out = {}
        for name, acc in self._sums.items():
            norm = acc if math.isinf(p) else acc.pow(1.0 / p)
            out[name] = norm / scale.to(norm.device) if scale is not None else norm
        self.disarm()
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_sums"], state["tracked"] = [], {}, []
        return state


def summarize_profile(profile: Tensor | Sequence[float]) -> dict[str, float]:
    """Summaries of a per-timestep norm profile (index 0 = earliest step, -1 = latest).

    * ``first_last_ratio``: norm at the earliest step / norm at the latest step.
    * ``decay_per_step``: the geometric factor by which the norm changes per step *back in time*
      (away from the loss at the end): exp(−slope) of a least-squares fit of log(norm) against t
      over the finite, positive entries. Below 1 is vanishing, above 1 is exploding; NaN with fewer
      than two such entries.
    * ``horizon``: how many steps back from the latest the norm stays at or above 1% of its
      (finite) maximum: the model's effective memory. A non-finite entry ends it.

    Example::

        >>> import torch
        >>> s = summarize_profile(torch.tensor([0.001, 0.02, 0.1, 1.0]))
        >>> round(s["first_last_ratio"], 6), round(s["decay_per_step"], 6), s["horizon"]
        (0.001, 0.107177, 3.0)
    """
    # Plain Python over a few dozen floats: cheaper than a dozen tiny tensor ops on each logging step.
    x = profile.detach().double().cpu().flatten().tolist() if isinstance(profile, Tensor) else list(profile)
    n = len(x)
    if n == 0:
        return {"first_last_ratio": math.nan, "decay_per_step": math.nan, "horizon": 0.0}
    first, last = x[0], x[-1]
    ratio = (math.nan if first == 0.0 else math.inf) if last == 0.0 else first / last
    points = [(t, math.log(v)) for t, v in enumerate(x) if math.isfinite(v) and v > 0]
    decay = math.nan
    if len(points) >= 2:
        t_mean = sum(t for t, _ in points) / len(points)
        y_mean = sum(y for _, y in points) / len(points)
        sxx = sum((t - t_mean) ** 2 for t, _ in points)
        sxy = sum((t - t_mean) * (y - y_mean) for t, y in points)
        decay = math.exp(-sxy / sxx)
    finite = [v for v in x if math.isfinite(v)]
    peak = max(finite) if finite else math.nan
    horizon = 0
    if peak > 0:
        for v in reversed(x):
            if not math.isfinite(v) or v < 0.01 * peak:
                break
            horizon += 1
    return {"first_last_ratio": ratio, "decay_per_step": decay, "horizon": float(horizon)}


class TimestepHistory:
    """The per-timestep profiles of recent logging steps, and their summaries.

    Attributes:
        norms: each sequence's latest profile (1-D CPU tensor).
        summaries: each sequence's latest :func:`summarize_profile`.
        heat: each sequence's last ``history`` (step, profile) pairs, for the heatmap.

    Example::

        >>> h = TimestepHistory(history=2)
        >>> h.add(9, "rnn", [0.5, 1.0])["first_last_ratio"]
        0.5
        >>> h.norms["rnn"].tolist(), [s for s, _ in h.heat["rnn"]]
        ([0.5, 1.0], [9])
    """

    def __init__(self, history: int = 64) -> None:
        self.history = history
        self.norms: dict[str, Tensor] = {}
        self.summaries: dict[str, dict[str, float]] = {}
        self.heat: dict[str, deque[tuple[int, Tensor]]] = {}

    def add(self, step: int, name: str, values: Sequence[float]) -> dict[str, float]:
        """Record one logging step's profile of ``name``; return its summary."""
        profile = torch.tensor(values, dtype=torch.float32)
        self.norms[name] = profile
        self.heat.setdefault(name, deque(maxlen=self.history)).append((step, profile))
        summary = summarize_profile(profile)
        self.summaries[name] = summary
        return summary


def make_tracker(track: Any, norm_type: float) -> TimestepTracker | None:
    """The tracker for ``track_timesteps`` (True: every recurrent module, a list: those, False: None).

    Raises:
        TypeError: ``track`` is neither a bool nor a list of module names.
    """
    if not isinstance(track, bool) and (
        isinstance(track, str) or not isinstance(track, Sequence) or not all(isinstance(n, str) for n in track)
    ):
        raise TypeError(f"Expected `track_timesteps` to be a bool or a list of module names, but got {track!r}.")
    if track is False:
        return None
    return TimestepTracker(norm_type, True if track is True else list(track))


def combine_profiles(per_rank: Sequence[dict[str, list[float]]], norm_type: float = 2.0) -> dict[str, list[float]]:
    """The profiles of a whole data-parallel batch from each rank's own.

    Data parallelism averages the ranks' gradients, so the global loss is the mean of the ranks'
    losses and each rank's ∂L/∂x_t is 1/R of its own. Each timestep's norm over the whole batch is
    therefore the p-th root of the sum over ranks of the p-th powers (the max for ``inf``), divided
    by R. A sequence shorter on some rank (variable lengths) contributes nothing past its end.

    Example::

        >>> combine_profiles([{"rnn": [3.0, 1.0]}, {"rnn": [4.0]}])
        {'rnn': [2.5, 0.5]}
    """
    ranks = len(per_rank)
    names = sorted({name for profiles in per_rank for name in profiles})
    out: dict[str, list[float]] = {}
    for name in names:
        rows = [profiles.get(name, []) for profiles in per_rank]
        length = max(len(r) for r in rows)
        combined = []
        for t in range(length):
            values = [r[t] for r in rows if t < len(r)]
            p = norm_type
            combined.append((max(values) if math.isinf(p) else sum(v**p for v in values) ** (1.0 / p)) / ranks)
        out[name] = combined
    return out


class TimestepTracking(GuardComponent):
    """Per-timestep tracking as the guard's ``timesteps`` component: the hooks are armed by
    ``begin_step`` on logging steps only, a logging step's profiles ride in its one read, and each
    profile's summary is logged (``gradguard/timestep/<name>/...``), kept in a history (the heatmap)
    and handed to the detectors (``vanishing_in_time``, ``exploding_in_time``). Under data
    parallelism every rank's profiles of a logging step are gathered, so that each is the whole
    batch's and the same on every rank.

    Args:
        tracker: the hooks (:func:`make_tracker`).
        history: how many logging steps the heatmap keeps.
    """

    name = "timesteps"
    order = 30

    def __init__(self, tracker: TimestepTracker, history: int = 64) -> None:
        self.tracker = tracker
        self.history = TimestepHistory(history)
        self.gather: Any = None
        self._warned = False

    def setup(self, setup: Setup) -> None:
        self.gather = setup.gather
        if setup.model is None:
            return
        tracked = self.tracker.watch(setup.model)
        missing = sorted((self.tracker.only or set()) - set(tracked))
        if missing and not self._warned:
            self._warned = True
            warn(unmatched("track_timesteps", missing, self.tracker.recurrent, "recurrent module"))

    def teardown(self) -> None:
        self.tracker.unwatch()

    def begin_step(self, step: int, logging: bool) -> None:
        tracker = self.tracker
        if logging:
            if tracker.armed:
                tracker.new_forward()
            else:
                tracker.arm()
        elif tracker.armed:
            tracker.disarm()

    def register(self, ctx: StepContext) -> None:
        tracker = self.tracker
        if not ctx.logging:
            if tracker.armed:
                tracker.disarm()
            return
        if tracker.armed:
            m = ctx.measurement
            profiles = tracker.collect(m.loss_scale if m is not None else None)
            for name, profile in profiles.items():
                ctx.put(f"timestep/{name}", profile)
            ctx.extra["profiles"] = list(profiles)

    def report(self, ctx: StepContext) -> None:
        report = ctx.report
        assert report is not None
        names = ctx.extra.get("profiles", [])
        profiles = {name: ctx.read.vector(f"timestep/{name}") for name in names}
        if self.gather is not None:  # every rank, every logging step
            profiles = combine_profiles(self.gather(profiles), self.tracker.norm_type)
            names = ctx.extra["profiles"] = list(profiles)
        for name, values in profiles.items():
            self.history.add(report.step, name, values)
            report.timesteps[name] = self.history.norms[name]
        report.metrics.update(timestep_metrics({name: self.history.summaries[name] for name in names}))
        report.timestep_heat = self.history.heat

    def observe(self, ctx: StepContext, obs: Observation) -> None:
        if obs.logged:
            obs.timestep_summaries = {name: self.history.summaries[name] for name in ctx.extra.get("profiles", [])}
