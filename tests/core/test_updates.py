"""``track_updates``: per-layer update-to-weight ratios, weight norms and Adam's √v on logging steps,
against references computed from copies of the weights and from the optimizer's own state; the
``update_spike`` and ``moment_collapse`` events; no host read added on healthy steps."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard import GuardCore
from tests.hostreads import host_reads

warnings.filterwarnings("ignore", message="GradGuard")


def _loop(steps: int, guard: GuardCore, model: nn.Module, opt: torch.optim.Optimizer, hook: Any = None) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    reports = []
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4, generator=g)).pow(2).mean().backward()
        report = guard.step(opt, step=step)
        if hook is not None:
            hook(step)
        opt.step()
        reports.append(report)
    return reports


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _layers(model: nn.Module) -> dict[str, list[Tensor]]:
    return {"0": [model[0].weight, model[0].bias], "2": [model[2].weight, model[2].bias]}


def test_update_ratios_and_weight_norms_equal_a_reference_from_copies_of_the_weights() -> None:
    model, opt = _model()
    guard = GuardCore(model, log_every_n_steps=5, track_updates=True)
    copies: dict[int, list[Tensor]] = {}

    def before_step(step: int) -> None:
        copies[step] = [p.detach().clone() for p in model.parameters()]

    reports = _loop(10, guard, model, opt, before_step)
    # step 4 logs: its ratio is of the update of step 3 (weights before it vs weights at step 4)
    after = copies[4]
    names = {id(p): i for i, p in enumerate(model.parameters())}
    metrics = reports[4].metrics
    for layer, params in _layers(model).items():
        idx = [names[id(p)] for p in params]
        w = torch.cat([after[i].flatten() for i in idx]).double()
        dw = torch.cat([(after[i] - copies[3][i]).flatten() for i in idx]).double()
        assert metrics[f"gradguard/weight_norm/{layer}"] == pytest.approx(float(w.norm()), rel=1e-6)
        assert metrics[f"gradguard/update_ratio/{layer}"] == pytest.approx(float(dw.norm() / w.norm()), rel=1e-6)
    every_w = torch.cat([t.flatten() for t in after]).double()
    every_dw = torch.cat([(a - b).flatten() for a, b in zip(after, copies[3], strict=True)]).double()
    assert metrics["gradguard/update_ratio"] == pytest.approx(float(every_dw.norm() / every_w.norm()), rel=1e-6)
    assert "gradguard/update_ratio" not in reports[3].metrics  # non-logging steps: nothing


def test_sqrt_v_statistics_equal_those_read_from_the_optimizer_state() -> None:
    model, opt = _model()
    guard = GuardCore(model, log_every_n_steps=5, track_updates=True)
    seen: dict[int, dict[str, tuple[float, float]]] = {}

    def read_state(step: int) -> None:  # the state the guard saw: before this step's update
        seen[step] = {}
        for layer, params in _layers(model).items():
            root = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params]).sqrt()
            seen[step][layer] = (float(root.min()), float(root.median()))

    reports = _loop(10, guard, model, opt, lambda s: read_state(s) if s == 9 else None)
    for layer, (vmin, vmed) in seen[9].items():
        assert reports[9].metrics[f"gradguard/sqrt_v_min/{layer}"] == pytest.approx(vmin, rel=1e-6)
        assert reports[9].metrics[f"gradguard/sqrt_v_median/{layer}"] == pytest.approx(vmed, rel=1e-6)


def test_an_update_spike_is_detected() -> None:
    model, opt = _model()
    guard = GuardCore(model, log_every_n_steps=1, track_updates=True, spike_zscore=None)

    def burst(step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = 10.0 if step == 12 else 1e-3

    _loop(15, guard, model, opt, burst)
    spikes = [e for e in guard.events if e.kind == "update_spike"]
    assert [e.step for e in spikes][:1] == [13]  # measured at the step after the burst's update
    assert spikes[0].origin in ("0", "2")


def test_a_collapsing_second_moment_is_detected_while_the_gradient_is_not() -> None:
    model, opt = _model()
    guard = GuardCore(model, log_every_n_steps=1, track_updates=True)

    def collapse(step: int) -> None:
        if step == 10:  # Adam's v of layer 2 falls by 8 decades (√v by 4), its gradient does not
            for p in (model[2].weight, model[2].bias):
                opt.state[p]["exp_avg_sq"].mul_(1e-8)

    _loop(13, guard, model, opt, collapse)
    (event,) = [e for e in guard.events if e.kind == "moment_collapse"][:1]
    assert event.step == 11 and event.layers == ("2",) and event.value >= 2.0  # decades of √v


def test_no_host_read_is_added_on_healthy_non_logging_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = GuardCore(model, log_every_n_steps=5, track_updates=True)
    g = torch.Generator().manual_seed(0)
    for step in range(9):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        with host_reads() as calls:
            report = guard.step(opt, step=step)
        opt.step()
        if step in (1, 2, 3, 5, 6, 7, 8):  # step 3 copies the weights for step 4: still no read
            assert calls == [], (step, calls)
        if step == 4:
            assert len(calls) == 1 and "gradguard/update_ratio/0" in report.metrics


def test_track_updates_refuses_sharded_parameters_and_bad_input() -> None:
    model, opt = _model()
    with pytest.raises(ValueError, match="track_updates=True does not support sharded parameters"):
        GuardCore(track_updates=True, sharded=True).prepare(model, [opt])
    with pytest.raises(TypeError, match="`track_updates` to be a bool, but got 'yes'"):
        GuardCore(track_updates="yes")  # type: ignore[arg-type]
