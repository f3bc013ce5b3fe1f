"""Replay attribution in a plain PyTorch loop: ``GuardCore.step(replay_closure=...)``."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard import GuardCore
from lightning_gradguard.core.attribution import attribute, describe
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


class Between(nn.Module):
    """l0 -> log -> l1: the ``log`` runs in this module's own ``forward``, between its two children."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1 = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.l1(torch.log(self.l0(x) - 100.0))  # finite values in, NaN out


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Between()


def test_a_value_made_between_two_modules_is_named_there_not_blamed_on_the_data() -> None:
    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(4, 3)  # finite data
    result = attribute(lambda: model.net(x).sum(), list(model.parameters()), model=model)
    assert (result["verdict"], result["forward_origin"], result["input_nonfinite"]) == ("data or numerics", "net",
                                                                                         False)  # fmt: skip
    assert result["produced"] == {"op": "log", "in": "net", "after": "net.l0", "before": "net.l1"}
    assert describe(result).endswith(
        "first went non-finite between net.l0 and net.l1, in the forward of net (log of finite values)."
    )


def test_a_value_made_in_the_step_s_own_code_is_named_there() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Linear(3, 3), "head": nn.Linear(3, 1)})
    x = torch.randn(4, 3)
    result = attribute(lambda: model["head"](model["enc"](x).exp() * math.inf).sum(), list(model.parameters()),
                       model=model)  # fmt: skip
    assert result["produced"] == {"op": "mul", "in": None, "after": "enc", "before": "head"}
    assert "first went non-finite between enc and head, in the step's own code (mul of finite values)" in describe(
        result
    )


def test_non_finite_weights_are_named_as_such() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    result = attribute(lambda: model(torch.ones(1, 2)).sum(), list(model.parameters()), model=model)
    assert (result["forward_origin"], result["input_nonfinite"], result["weights_nonfinite"]) == ("1", False, True)
    assert describe(result).endswith("first went non-finite in 1 (its weights were already non-finite).")


def test_a_harmless_minus_inf_mask_is_not_the_origin() -> None:
    """An attention mask filled with -inf on purpose is non-finite and harmless: the origin is the first
    module whose *output* is non-finite, here an RNN whose recurrence overflows from finite inputs."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1e4 * torch.eye(4))
        rnn.weight_ih_l0.fill_(1.0)

    def step() -> Tensor:
        mask = torch.zeros(2, 2).masked_fill(torch.eye(2, dtype=torch.bool), -math.inf)
        out, _ = rnn(torch.ones(30, 2, 3))
        return out.sum() + torch.softmax(mask, -1).sum()

    result = attribute(step, list(rnn.parameters()), model=rnn)
    assert (result["forward_origin"], result["input_nonfinite"], "produced" in result) == ("RNN", False, False)


class CarriedLoop(nn.Module):
    """A plain loop's truncated BPTT: ``forward`` reassigns ``self.hidden`` (see the Lightning twin in
    tests/integrations/test_replay.py): the recurrence doubles it, so it overflows from finite inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 8, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_ih_l0.fill_(0.1)
            self.rnn.weight_hh_l0.copy_(2 * torch.eye(8))
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = hidden.detach()
        last = out[:, -1]
        return (last / last.norm(dim=1, keepdim=True)).sum()


def test_guardcore_replays_from_the_attributes_the_step_began_with() -> None:
    """The closure's contract: ``begin_step()`` before the forward pass keeps the watched model's
    attributes; the replay runs with those, and the step's own results are put back afterwards."""
    torch.manual_seed(0)
    model = CarriedLoop()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = GuardCore(model, log_every_n_steps=None, max_consecutive_skips=100)
    x = torch.rand(4, 10, 3)
    for _ in range(16):
        guard.begin_step()
        opt.zero_grad()
        loss = model(x)
        guard.observe_loss(loss)
        loss.backward()
        after = model.hidden
        if not guard.step(opt, replay_closure=lambda: model(x)).skipped:
            opt.step()
        assert model.hidden is after  # the replay put the step's own result back
    event = next(e for e in guard.events if e.kind == "nonfinite")
    replay = event.extra["replay"]
    assert (replay["verdict"], replay["forward_origin"], replay["input_nonfinite"]) == ("data or numerics", "rnn",
                                                                                         False)  # fmt: skip
