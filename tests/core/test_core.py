"""The framework-free core in a plain PyTorch loop (no Lightning involved)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuardWarning, GuardCore, NonFiniteGradientError, NormClip
from tests.helpers import assert_same_state, poison, snapshot


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 1)
        self.poison_at: int | None = None
        self.value = math.nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate((self.a, self.b, self.c)):
            x = layer(x)
            if self.poison_at == i:
                x = poison(x, self.value)
            x = torch.tanh(x) if i < 2 else x
        return x


def run(core: GuardCore, model: MLP, opt: torch.optim.Optimizer, steps: int, faults: dict[int, int]) -> list[bool]:
    skipped = []
    torch.manual_seed(1)
    for step in range(steps):
        model.poison_at = faults.get(step)
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        core.observe_loss(loss)
        loss.backward()
        report = core.step(opt)
        if not report.skipped:
            opt.step()
        skipped.append(report.skipped)
    return skipped


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(("layer", "names"), [(0, ["a"]), (1, ["a", "b"]), (2, ["a", "b", "c"])])
def test_origin_is_the_poisoned_layer(value: float, layer: int, names: list[str]) -> None:
    model = MLP()
    model.value = value
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    core = GuardCore(model)
    with pytest.warns(GradGuardWarning, match=f"origin '{names[-1]}'"):
        skipped = run(core, model, opt, 5, {3: layer})
    assert skipped == [False, False, False, True, False]
    (event,) = core.events
    assert event.kind == "nonfinite" and event.step == 3
    assert event.origin == names[-1]
    assert list(event.layers) == names
    assert core.skipped_steps == 1 and core.nonfinite_steps == 1 and core.consecutive_skips == 0


def test_skip_leaves_weights_and_optimizer_state_bit_identical() -> None:
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    core = GuardCore(model)
    run(core, model, opt, 3, {})
    before = snapshot(model, opt)
    model.poison_at = 1
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    with pytest.warns(GradGuardWarning):
        report = core.step(opt)
    assert report.skipped
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # a loop that steps anyway changes nothing
    assert_same_state(before, snapshot(model, opt))


def test_nan_loss_is_origin_loss() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model)
    loss = model(torch.randn(2, 4)).sum() * math.nan
    core.observe_loss(loss)
    loss.backward()
    with pytest.warns(GradGuardWarning, match="origin 'loss'"):
        core.step(opt)
    assert core.events[-1].origin == "loss"
    assert list(core.events[-1].layers) == ["a", "b", "c"]


def test_raise_policy() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, on_nonfinite="raise")
    with pytest.warns(GradGuardWarning), pytest.raises(NonFiniteGradientError, match="step 2.*origin 'b'") as info:
        run(core, model, opt, 4, {2: 1})
    assert info.value.event is not None and info.value.event.origin == "b"


def test_warn_policy_does_not_skip() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, on_nonfinite="warn")
    skipped = run(core, model, opt, 3, {1: 2})
    assert skipped == [False, False, False]
    assert core.nonfinite_steps == 0  # non-logging steps under "warn": no host sync, flags read later
    with pytest.warns(GradGuardWarning, match="NOT skipped"):
        core.flush()
    assert [e.step for e in core.events] == [1, 2]
    # "warn" lets the NaN into the weights, so the next step is non-finite too: nothing was skipped.
    assert core.nonfinite_steps == 2 and core.skipped_steps == 0
    assert not torch.isfinite(model.a.weight).all()


def test_stop_policy_skips_and_asks_to_stop() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, on_nonfinite="stop")
    model.poison_at = 0
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(GradGuardWarning):
        report = core.step(opt)
    assert report.skipped and report.should_stop


def test_max_consecutive_skips_raises() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, max_consecutive_skips=3)
    with pytest.warns(GradGuardWarning), pytest.raises(NonFiniteGradientError, match="3 consecutive"):
        run(core, model, opt, 10, {2: 0, 3: 0, 4: 0})
    assert core.skipped_steps == 3
    # two in a row, then a healthy step, resets the run
    core2 = GuardCore(model, max_consecutive_skips=3)
    with pytest.warns(GradGuardWarning):
        run(core2, model, opt, 8, {1: 0, 2: 0, 4: 0, 5: 0})
    assert core2.skipped_steps == 4


def test_state_dict_round_trip_and_pickle() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, clip=NormClip(0.01))
    with pytest.warns(GradGuardWarning):
        run(core, model, opt, 6, {1: 0, 2: 1})
    state = core.state_dict()
    assert state["skipped_steps"] == 2 and state["nonfinite_steps"] == 2 and state["steps"] == 6
    assert state["clipped_steps"] == 4
    fresh = GuardCore(clip=NormClip(0.01))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.load_state_dict({"skipped_steps": 1})  # an older checkpoint without the newer keys
    assert fresh.skipped_steps == 1 and fresh.nonfinite_steps == 0
    clone = pickle.loads(pickle.dumps(core))
    assert clone.state_dict() == state
    assert "2 skipped" in core.summary() and "origins: a x1, b x1" in core.summary()


@pytest.mark.parametrize(
    ("kwargs", "exc", "arg"),
    [
        ({"norm_type": 0}, ValueError, "norm_type"),
        ({"norm_type": -2.0}, ValueError, "norm_type"),
        ({"norm_type": "2"}, TypeError, "norm_type"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"on_nonfinite": None}, TypeError, "on_nonfinite"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"max_consecutive_skips": 2.5}, TypeError, "max_consecutive_skips"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"group_by": "module"}, ValueError, "group_by"),
        ({"clip": 1.0}, TypeError, "clip"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type[Exception], arg: str) -> None:
    with pytest.raises(exc, match=f"Expected `{arg}` to be .*but got"):
        GuardCore(**kwargs)  # type: ignore[arg-type]


def test_gradscaler_overflow_is_amp_overflow_in_plain_loop() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    core = GuardCore(model)
    before = snapshot(model, opt)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(4, 4)).float().sum() * 1e30
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    report = core.step(opt, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert report.amp_overflow and not report.skipped and not report.nonfinite
    assert core.events[-1].kind == "amp_overflow" and core.nonfinite_steps == 0
    assert_same_state(before[0], snapshot(model, opt)[0])
    assert scaler.get_scale() == 2.0**15


def test_scaled_gradients_are_measured_unscaled() -> None:
    """A fused optimizer leaves gradients scaled at the guard: the guard divides by the scale."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 4)
    model(x).sum().backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(x).sum()).backward()
    core = GuardCore(model, clip=NormClip(0.5), log_every_n_steps=1)
    report = core.step(opt, scaler=scaler)  # not unscaled: stage READY
    assert report.metrics["gradguard/total_norm"] == pytest.approx(ref, rel=1e-5)
    # NormClip's coefficient came from the unscaled norm, and scaling is linear: exact on scaled grads.
    coef = 0.5 / (ref + 1e-6)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        assert torch.allclose(p.grad / 1024.0, g * coef, rtol=1e-4, atol=1e-7)


def test_a_warning_names_the_line_that_called_step_not_the_library() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model, replay=False)
    model.poison_at = 1
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    with pytest.warns(GradGuardWarning, match="non-finite gradient") as caught:
        line = __import__("inspect").currentframe().f_lineno + 1  # type: ignore[union-attr]
        core.step(opt)
    (warning,) = [w for w in caught if issubclass(w.category, GradGuardWarning)]
    assert (warning.filename, warning.lineno) == (__file__, line)
    with pytest.warns(GradGuardWarning, match="nothing to measure") as caught:  # another path, deeper in the core
        line = __import__("inspect").currentframe().f_lineno + 1  # type: ignore[union-attr]
        core.step(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_names_that_match_nothing_warn_with_the_closest_name() -> None:
    from lightning_gradguard import AGC

    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 3))
    model.add_module("rnn", nn.GRU(3, 3))
    model.add_module("head", nn.Linear(3, 1))
    with pytest.warns(GradGuardWarning) as caught:
        GuardCore(model, clip=AGC(exclude=["haed", "body*"]), track_timesteps=["rnnn"])
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "GradGuard: AGC(clip_factor=0.01, eps=0.001, exclude=['haed', 'body*']) names 'haed', which matches no layer "
        "or parameter of the model (did you mean 'head'?).",
        "GradGuard: track_timesteps names 'rnnn', which matches no recurrent module of the model "
        "(did you mean 'rnn'?).",
    ]
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", GradGuardWarning)
        GuardCore(model, clip=AGC(exclude=["head", "body*", "rnn.weight_ih_l0"]), track_timesteps=["rnn"])


def test_a_model_that_is_not_a_module_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module \(or None\), but got 'x'"):
        GuardCore("x")  # type: ignore[arg-type]


def test_under_a_trainer_a_warning_names_the_fit_line() -> None:
    import pytorch_lightning as pl

    from tests.helpers import FaultNet, trainer

    t = trainer([__import__("lightning_gradguard").GradGuard()], steps=3)
    model: pl.LightningModule = FaultNet({1: ("grad", 1, math.nan)})
    with pytest.warns(GradGuardWarning, match="non-finite gradient at step 1") as caught:
        line = __import__("inspect").currentframe().f_lineno + 1  # type: ignore[union-attr]
        t.fit(model)
    ours = [w for w in caught if issubclass(w.category, GradGuardWarning)]
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)]
