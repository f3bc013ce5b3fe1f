"""Per-timestep gradient norms against torch.autograd.grad, and their summaries."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_gradguard import GuardCore
from lightning_gradguard.core.timesteps import summarize_profile, track_timesteps


def per_step(grad: Tensor, time_dim: int, p: float = 2.0) -> Tensor:
    g = grad.movedim(time_dim, 0)
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), p, dim=1)


class Seq(nn.Module):
    def __init__(self, kind: str, batch_first: bool, bidirectional: bool, layers: int, upstream: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(3, 5) if upstream else None
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(5 if upstream else 3, 6, num_layers=layers, batch_first=batch_first,
                       bidirectional=bidirectional)
        self.head = nn.Linear(6 * (2 if bidirectional else 1), 1)
        self.batch_first = batch_first
        self.rnn_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x) if self.pre is not None else x
        self.rnn_input = h
        out, _ = self.rnn(h)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last).pow(2).sum() + out.mean()


def guarded_profile(
    model: nn.Module, run: Any, norm_type: float = 2.0, name: str = "rnn"
) -> tuple[Tensor, list[Tensor]]:
    core = GuardCore(model, norm_type=norm_type, log_every_n_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core.begin_step()
    run().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    report = core.step(opt)
    core.unwatch()
    return report.timesteps[name], grads


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("bidirectional", "layers", "upstream"), [(False, 1, True), (True, 2, False), (True, 1, True)])
def test_dense_matches_autograd(kind: str, batch_first: bool, bidirectional: bool, layers: int, upstream: bool) -> None:
    model = Seq(kind, batch_first, bidirectional, layers, upstream)
    torch.manual_seed(1)
    x = torch.randn(4, 9, 3) if batch_first else torch.randn(9, 4, 3)
    # reference, no guard: the gradient that reaches the RNN's input at each step
    if upstream:
        loss = model(x)
        ref_grad = torch.autograd.grad(loss, model.rnn_input)[0]
    else:
        xr = x.clone().requires_grad_(True)
        ref_grad = torch.autograd.grad(model(xr), xr)[0]
    model.zero_grad()
    reference = per_step(ref_grad, 1 if batch_first else 0)
    (ref_params,) = [[g.clone() for g in torch.autograd.grad(model(x), list(model.parameters()))]]
    profile, grads = guarded_profile(model, lambda: model(x))
    assert profile.shape == (9,)
    torch.testing.assert_close(profile, reference, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_params, strict=True):  # tracking never changes a gradient
        assert torch.equal(a, b)
    assert not x.requires_grad  # the user's tensor is untouched


def test_input_that_requires_grad_keeps_its_gradient() -> None:
    model = Seq("gru", True, False, 1, upstream=False)
    x = torch.randn(2, 6, 3, requires_grad=True)
    ref = torch.autograd.grad(model(x), x)[0]
    profile, _ = guarded_profile(model, lambda: model(x))
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=0)  # flows into the user's leaf unchanged
    torch.testing.assert_close(profile, per_step(ref, 1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("p", [1.0, math.inf])
def test_other_norm_types(p: float) -> None:
    model = Seq("lstm", True, False, 1, upstream=False)
    x = torch.randn(3, 5, 3)
    xr = x.clone().requires_grad_(True)
    ref = per_step(torch.autograd.grad(model(xr), xr)[0], 1, p)
    profile, _ = guarded_profile(model, lambda: model(x), norm_type=p)
    torch.testing.assert_close(profile, ref, rtol=1e-5, atol=0)


def test_packed_sequence_counts_only_present_steps() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, batch_first=True)
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 3)

    def loss_of(inp: Tensor) -> Tensor:
        packed = pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = rnn(packed)
        return h.pow(2).sum()

    xr = x.clone().requires_grad_(True)
    ref = per_step(torch.autograd.grad(loss_of(xr), xr)[0], 1)  # padded entries get zero gradient
    profile, _ = guarded_profile(rnn, lambda: loss_of(x), name="lstm")
    torch.testing.assert_close(profile, ref, rtol=1e-5, atol=0)


def test_unrolled_grucell() -> None:
    class Unrolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.cell = nn.GRUCell(3, 4)
            self.states: list[Tensor] = []

        def forward(self, x: Tensor) -> Tensor:
            h = torch.zeros(x.shape[0], 4)
            self.states = []
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
                self.states.append(h)
            return h.pow(2).sum()

    model = Unrolled()
    x = torch.randn(2, 6, 3)
    loss = model(x)
    grads = torch.autograd.grad(loss, model.states)
    ref = torch.stack([g.norm() for g in grads])
    profile, _ = guarded_profile(model, lambda: model(x), name="cell")
    torch.testing.assert_close(profile, ref, rtol=1e-5, atol=0)


def test_track_timesteps_on_custom_tensor_and_accumulation() -> None:
    torch.manual_seed(0)
    proj = nn.Linear(3, 4)
    x1, x2 = torch.randn(2, 5, 3), torch.randn(3, 5, 3)

    def loss_of(x: Tensor, track: bool) -> tuple[Tensor, Tensor]:
        h = proj(x)
        h = track_timesteps(h, "custom", time_dim=1) if track else h
        return (h.cumsum(1)[:, -1] ** 2).sum(), h

    # reference: both micro-batches as one batch
    ref_parts = []
    for x in (x1, x2):
        loss, h = loss_of(x, False)
        ref_parts.append(torch.autograd.grad(loss, h)[0])
    ref = per_step(torch.cat(ref_parts), 1)
    core = GuardCore(proj, log_every_n_steps=1)
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    for x in (x1, x2):
        core.begin_step()
        loss_of(x, True)[0].backward()
    report = core.step(opt)
    torch.testing.assert_close(report.timesteps["custom"], ref, rtol=1e-5, atol=0)
    assert torch.equal(core.timestep_norms["custom"], report.timesteps["custom"])


def test_no_logging_step_means_no_hooks() -> None:
    model = Seq("rnn", True, False, 1, upstream=False)
    core = GuardCore(model, log_every_n_steps=4)
    calls = {"n": 0}
    original = core.timesteps._alias  # type: ignore[union-attr]

    def counting(*args: Any) -> Tensor:
        calls["n"] += 1
        return original(*args)

    core.timesteps._alias = counting  # type: ignore[union-attr, method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    got = []
    for _ in range(8):
        core.begin_step()
        model(torch.randn(2, 4, 3)).backward()
        got.append(bool(core.step(opt).timesteps))
        opt.zero_grad()
    assert got == [False, False, False, True] * 2
    assert calls["n"] == 2
    h = torch.randn(2, 3, requires_grad=True)
    assert track_timesteps(h, "x") is h  # not armed: the very same tensor


@pytest.mark.parametrize(
    ("profile", "ratio", "decay", "horizon"),
    [
        ([1e-3, 1e-2, 1e-1, 1.0], 1e-3, 0.1, 3.0),
        ([1.0, 0.5, 0.25], 4.0, 2.0, 3.0),
        ([2.0], 1.0, math.nan, 1.0),
        ([0.0, 0.0], math.nan, math.nan, 0.0),
        ([0.0, 1.0, 0.0], math.nan, math.nan, 0.0),
        ([1.0, 0.0], math.inf, math.nan, 0.0),
        ([math.nan, 1.0, 1.0], math.nan, 1.0, 2.0),
        ([1.0, math.nan, 1e-3, 1.0], 1.0, None, 1.0),
        ([], math.nan, math.nan, 0.0),
    ],
)
def test_summaries_on_hand_built_profiles(
    profile: list[float], ratio: float, decay: float | None, horizon: float
) -> None:
    if decay is None:  # independent reference: numpy's least-squares fit over finite positive entries
        import numpy as np

        t = [i for i, v in enumerate(profile) if math.isfinite(v) and v > 0]
        decay = float(np.exp(-np.polyfit(t, np.log([profile[i] for i in t]), 1)[0]))
    s = summarize_profile(torch.tensor(profile, dtype=torch.float64))
    for got, want in ((s["first_last_ratio"], ratio), (s["decay_per_step"], decay)):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-9)
    assert s["horizon"] == horizon


def test_vanishing_in_time_events_are_rate_limited() -> None:
    torch.manual_seed(0)
    model = nn.RNN(3, 6, batch_first=True)
    with torch.no_grad():
        model.weight_hh_l0.mul_(0.2)  # contractive recurrence: the gradient vanishes through time
    core = GuardCore(model, log_every_n_steps=1, timestep_vanish_ratio=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(4, 30, 3)
    for _ in range(250):
        core.begin_step()
        model(x)[0][:, -1].sum().backward()
        core.step(opt)
        opt.zero_grad()
    events = [e for e in core.events if e.kind == "vanishing_in_time"]
    assert [e.step for e in events] == [0, 100, 200]
    assert events[0].value < 1e-4 and events[0].layers == ("rnn",)
    assert "99 more times since step 0" in events[1].message
    assert core.timestep_summaries["rnn"]["first_last_ratio"] < 1e-4
