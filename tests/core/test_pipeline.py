"""The step pipeline's contracts: the named host read, one read per step, pluggable detectors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard import GradEvent, GuardCore, NormClip
from lightning_gradguard.core.hostread import HostRead
from lightning_gradguard.detectors import Detector, Observation
from tests.hostreads import host_reads


def test_host_read_returns_values_by_name_with_one_tolist() -> None:
    a, b = HostRead(), HostRead()
    a.put_each(("grad_bad", "total"), torch.tensor([0.0, 5.0]))
    a.put("layers", torch.tensor([[3.0, 4.0]]))
    b.put("profile", torch.tensor([1.0, 2.0, 3.0]))
    assert not a.done
    with host_reads() as calls:
        HostRead.read_all([a, b])
    assert [c.what for c in calls] == ["Tensor.tolist"]
    assert a.done and b.done
    assert (a["grad_bad"], a["total"], a.vector("layers")) == (0.0, 5.0, [3.0, 4.0])
    assert b.vector("profile") == [1.0, 2.0, 3.0]
    assert a.get("missing", math.pi) == math.pi and "layers" in a and "missing" not in a


def test_host_read_refuses_misuse() -> None:
    read = HostRead()
    read.put("x", torch.ones(2))
    with pytest.raises(RuntimeError, match="not read yet"):
        read.vector("x")
    with pytest.raises(KeyError, match="registered twice"):
        read.put("x", torch.ones(1))
    with pytest.raises(ValueError, match="Expected 2 values"):
        read.put_each(("a", "b"), torch.ones(3))
    read.read()
    with pytest.raises(KeyError, match="use vector"):
        read["x"]


def _model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _backward(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()


@pytest.mark.parametrize(
    ("policy", "log", "expected"),
    [("skip", False, 1), ("skip", True, 1), ("warn", False, 0), ("warn", True, 1)],
)
def test_one_host_read_per_healthy_step(policy: str, log: bool, expected: int) -> None:
    model, opt = _model_and_opt()
    guard = GuardCore(model, clip=NormClip(0.1), on_nonfinite=policy, log_every_n_steps=None)  # type: ignore[arg-type]
    _backward(model)
    guard.step(opt, log=log)  # the first step records the forward order and learns the layout
    for _ in range(3):
        _backward(model)
        with host_reads() as calls:
            report = guard.step(opt, log=log)
        assert [c.what for c in calls] == ["Tensor.tolist"] * expected, calls  # HostRead.read_all's, if any
        assert not report.skipped


class Over:
    """A user detector: a headline event above a fixed total norm."""

    headline = True
    state_key = None

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.seen: list[Observation] = []

    def detect(self, obs: Observation) -> list[GradEvent]:
        self.seen.append(obs)
        if obs.finite and obs.total > self.limit:
            return [GradEvent("exploding", step=obs.step, value=obs.total, message=f"over {self.limit}")]
        return []


def test_a_new_detector_is_one_object_with_detect() -> None:
    model, opt = _model_and_opt()
    guard = GuardCore(model, log_every_n_steps=2)
    over = Over(0.0)
    assert isinstance(over, Detector)
    guard.detectors.append(over)
    reports = []
    for _ in range(4):
        _backward(model)
        reports.append(guard.step(opt))
    assert [r.event.message if r.event else None for r in reports] == ["over 0.0"] * 4
    assert [e.message for e in guard.events] == ["over 0.0"] * 4
    # it sees host values only: the total as read, and per-layer norms on logging steps
    assert [o.logged for o in over.seen] == [False, True, False, True]
    assert over.seen[1].layer_norms == reports[1].layer_norms and set(over.seen[1].layer_norms) == {"0", "2"}
    assert over.seen[3].total == pytest.approx(reports[3].metrics["gradguard/total_norm"])
    assert guard.state_dict()["kinds"] == {"exploding": 4}


def test_value_clip_costs_one_more_read_on_a_logging_step_and_its_count_stays_exact() -> None:
    """ValueClip is applied after the read (it cannot be made NaN-safe), so a logging step reads its
    values once more; the clipped-step count rides in that read instead of costing a third."""
    from lightning_gradguard import ValueClip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, clip=ValueClip(1e-4), log_every_n_steps=2)
    reads, fractions = [], []
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        with host_reads() as calls:
            report = guard.step(opt)
        reads.append([c.what for c in calls])
        fractions.append(report.metrics.get("gradguard/clipped_fraction"))
    assert reads == [["Tensor.tolist"], ["Tensor.tolist"] * 2] * 3
    assert fractions == [None, 1.0] * 3 and guard.clipped_steps == 6  # every step clipped at 1e-4
