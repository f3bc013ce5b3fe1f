"""The spike statistic on the host: with the ``spike`` event alone (no ``skip_spikes``, no rollback on
confirmed spikes) nothing on the device reads it, so the rule runs on the host, on the total norm the
step reads anyway: the same numbers as on the device, and no kernel on the step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_gradguard import GuardCore, Rollback
from tests.core.test_rollback import Loop


def _run(steps: int = 50, **guard: Any) -> Loop:
    loop = Loop(spike_zscore=4.0, spike_warmup=5, log_every_n_steps=None, **guard)
    loop.faults.update({12: 1e4, 20: 1e5, 25: "nan"})
    for s in range(30, 42):  # a lasting new level: 8 flagged steps in a row restart the statistics
        loop.faults[s] = 1000.0
    loop.run(steps)
    return loop


def test_the_event_alone_scores_on_the_host_with_the_device_s_numbers() -> None:
    host = _run()
    device = _run(skip_spikes=1e9)  # a skip that never fires keeps the statistic on the device
    assert host.guard.spike is not None and device.guard.spike is not None
    assert host.guard.spike.on_host and not device.guard.spike.on_host
    spikes = {name: [(e.step, e.value) for e in loop.guard.events if e.kind == "spike"]
              for name, loop in (("host", host), ("device", device))}  # fmt: skip
    assert [s for s, _ in spikes["host"]] == [s for s, _ in spikes["device"]]
    assert {12, 20, 30} <= {s for s, _ in spikes["host"]}
    # the same float64 arithmetic on both sides, but the device's z-score reaches the host in the step's
    # float32 read (rel 6e-8): rel 1e-6
    for (_, h), (_, d) in zip(spikes["host"], spikes["device"], strict=True):
        assert h == pytest.approx(d, rel=1e-6)
    h_state, d_state = host.guard.spike.state_dict(), device.guard.spike.state_dict()
    assert h_state["norm"][0] == d_state["norm"][0] and h_state["norm"][3] == d_state["norm"][3]  # n, run
    assert h_state["norm"][1:3] == pytest.approx(d_state["norm"][1:3], rel=1e-12)
    assert h_state["norm"][0] < 20  # the new level restarted the statistics (50 steps, fewer fed)
    assert math.isfinite(h_state["norm"][1])
    # in the middle of the new level: both rows count the flagged steps in a row, as on the device
    mid = [loop.guard.spike.state_dict() for loop in (_run(35), _run(35, skip_spikes=1e9))]  # type: ignore[union-attr]
    assert mid[0]["norm"][3] == mid[0]["loss"][3] == mid[1]["norm"][3] == mid[1]["loss"][3] > 0


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of_a_step(**guard: Any) -> list[str]:
    loop = Loop(log_every_n_steps=None, **guard)
    loop.run(8)
    loop.opt.zero_grad()
    loop.model(torch.randn(16, 4)).pow(2).mean().backward()
    with _Ops() as seen:
        loop.guard.step(loop.opt, step=8)
    return seen.ops


def test_the_spike_event_adds_no_kernel_to_a_step() -> None:
    assert _ops_of_a_step(spike_zscore=6.0) == _ops_of_a_step(spike_zscore=None)
    assert len(_ops_of_a_step(skip_spikes=6.0)) > len(_ops_of_a_step(spike_zscore=None))  # the device's rule


def test_a_rollback_restores_the_host_statistic_as_the_device_s() -> None:
    rolled = {}
    for name, extra in (("host", {}), ("device", {"skip_spikes": 1e9})):
        loop = _run(rollback=Rollback(every=4, keep=2), **extra)
        assert loop.guard.spike is not None and loop.guard.spike.on_host == (name == "host")
        snap = loop.guard.recovery.ring.snapshots[-1]  # type: ignore[union-attr]
        kept = snap.guard["components"]["spike"]
        assert isinstance(kept, list if name == "host" else torch.Tensor)  # host floats: no tensor to copy
        loop.guard.rollback()
        rolled[name] = loop.guard.spike.state_dict()["norm"]
        assert rolled[name] == (kept[0] if name == "host" else kept[0].tolist())
        assert rolled[name][0] >= 1  # a statistic with steps in it
    assert rolled["host"][0] == rolled["device"][0]
    assert rolled["host"][1:3] == pytest.approx(rolled["device"][1:3], rel=1e-12)


def test_a_checkpoint_of_the_device_statistic_loads_on_the_host() -> None:
    device = _run(skip_spikes=1e9)
    fresh = GuardCore(spike_zscore=4.0, spike_warmup=5)
    fresh.load_state_dict(device.guard.state_dict())
    assert fresh.spike is not None and fresh.spike.on_host and device.guard.spike is not None
    assert fresh.spike.state_dict()["norm"] == device.guard.spike.state_dict()["norm"]
    assert fresh.spike.stats == device.guard.spike.stats
    assert fresh.spike._host_step(math.exp(fresh.spike.stats[1]), True) == pytest.approx(0.0, abs=1e-9)
