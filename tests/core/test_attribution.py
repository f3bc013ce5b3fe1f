"""Replay attribution in a plain PyTorch loop: ``GuardCore.step(replay_closure=...)``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard import GuardCore
from lightning_gradguard.core.attribution import attribute
from lightning_gradguard.dump import capture_rng
from tests.helpers import Once, once

warnings.filterwarnings("ignore", message="GradGuard")


def _run(fault: str) -> GuardCore:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model, log_every_n_steps=None)
    Once.reset()
    for step in range(4):
        x = torch.randn(8, 4)
        if fault == "data" and step == 2:
            x[0, 0] = math.inf

        def loss_of(x: Tensor = x, step: int = step) -> Tensor:
            h = model(x)
            return (once(h) if fault == "transient" and step == 2 else h).pow(2).mean()

        guard.begin_step()  # keeps the RNG state before the forward pass (dropout)
        opt.zero_grad()
        loss = loss_of()
        guard.observe_loss(loss)
        loss.backward()
        report = guard.step(opt, replay_closure=loss_of)
        if not report.skipped:
            opt.step()
    return guard


def test_a_plain_loop_gets_the_same_verdicts() -> None:
    data = next(e for e in _run("data").events if e.kind == "nonfinite").extra["replay"]
    assert (data["verdict"], data["forward_origin"], data["input_nonfinite"]) == ("data or numerics", "0", True)
    transient = next(e for e in _run("transient").events if e.kind == "nonfinite").extra["replay"]
    assert transient["verdict"] == "transient" and transient["replays"] == 2


def test_a_replay_leaves_grad_and_the_rng_stream_untouched() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    x = torch.ones(4, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    rng = capture_rng()
    result = attribute(lambda: model(x).sum(), list(model.parameters()), model=model, rng=rng)
    assert result["verdict"] == "transient"  # finite twice
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng["torch"])  # the run's stream goes on where it was


def _spiky(kind: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = GuardCore(model, log_every_n_steps=None, skip_spikes=6.0, spike_warmup=5)
    Once.reset()
    g = torch.Generator().manual_seed(0)
    for step in range(9):
        x = torch.randn(8, 4, generator=g) * (1e3 if kind == "data" and step == 7 else 1.0)

        def loss_of(x: Tensor = x, step: int = step) -> Tensor:
            h = model[0](x)
            h = once(h, 1e3) if kind == "transient" and step == 7 else h
            return model[2](torch.tanh(h)).pow(2).mean()

        guard.begin_step()
        opt.zero_grad()
        loss = loss_of()
        guard.observe_loss(loss)
        loss.backward()
        if not guard.step(opt, replay_closure=loss_of).skipped:
            opt.step()
    (event,) = [e for e in guard.events if e.kind == "spike_skipped"]
    return event.extra["replay"]


def test_the_first_skipped_spike_is_replayed_too() -> None:
    assert _spiky("transient")["verdict"] == "transient"  # the x1e3 backward did not happen again
    assert _spiky("data")["verdict"] == "data or numerics"  # a x1e3 batch spikes again on replay


def test_bad_replay_arguments_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="`replay` to be a bool, but got 'always'"):
        GuardCore(replay="always")  # type: ignore[arg-type]
