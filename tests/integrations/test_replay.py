"""Why did it break? The first faulty step is replayed: a transient fault, a data fault, a precision
fault and a poisoned carried state each get their verdict and forward origin; a replay that raises
is reported and never crashes the run. The messages printed here are the README's examples."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradEvent, GradGuard, GradGuardWarning
from tests.helpers import Once, once, poison, trainer

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")


class Log(nn.Module):
    """``log`` of its input: NaN on a negative value."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x)


class Gain(nn.Module):
    """Multiplies by ``factor``: in fp16 a large factor overflows (65504) where float32 does not."""

    factor = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class Net(pl.LightningModule):
    """enc -> log -> big -> gain -> head. ``mode``: "transient" (a one-time NaN gradient at step 3), "data"
    (batch 3 holds a negative value: log gives NaN), "precision" (gain's output exceeds fp16's range
    at step 3), "raises" (training_step cannot run twice on batch 3)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.enc = nn.Linear(4, 8)
        self.log_layer = Log()
        self.big = nn.Linear(8, 8)
        self.gain = Gain()
        self.head = nn.Linear(8, 1)
        self.calls: dict[int, int] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        step = self.trainer.global_step
        self.calls[batch_idx] = self.calls.get(batch_idx, 0) + 1
        if self.mode == "raises" and step == 3 and self.calls[batch_idx] > 1:
            raise RuntimeError("the batch's iterator is exhausted")
        h = self.log_layer(torch.sigmoid(self.enc(x)) + (x[:, :1] if self.mode == "data" else 0.0))
        if self.mode == "transient" and step == 3:
            h = once(h)
        self.gain.factor = 1e6 if self.mode == "precision" and step == 3 else 1.0
        h = self.gain(torch.tanh(self.big(h)))
        loss = nn.functional.mse_loss(self.head(h), y)
        if self.mode == "raises" and step == 3:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(64, 4, generator=g), torch.randn(64, 1, generator=g)
        if self.mode == "data":
            x[3 * 8, 0] = -5.0  # batch 3: log of a negative number
        return DataLoader(TensorDataset(x, y), batch_size=8)


def _first_fault(mode: str, **trainer_kwargs: Any) -> GradEvent:
    Once.reset()
    guard = GradGuard(log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=6, **trainer_kwargs).fit(Net(mode))
    event = next(e for e in guard.events if e.kind == "nonfinite")
    print(event.message)  # the README's examples
    return event


def test_a_transient_fault_is_named_transient_with_the_rank_and_device() -> None:
    event = _first_fault("transient")
    replay = event.extra["replay"]
    assert (event.step, replay["verdict"], replay["replays"]) == (3, "transient", 2)
    assert replay["faulty_ranks"] == [0] and replay["device"] == "cpu" and replay["host"]
    assert "Replay: transient (did not reproduce in 2 replays): suspect the hardware on rank(s) 0" in event.message


def test_a_fault_from_the_data_is_data_or_numerics_at_the_module_that_broke() -> None:
    event = _first_fault("data")
    replay = event.extra["replay"]
    assert (replay["verdict"], replay["forward_origin"], replay["input_nonfinite"]) == (
        "data or numerics", "log_layer", False,
    )  # fmt: skip
    expected = "Replay: data or numerics (reproduces in float32); the forward pass first went non-finite in log_layer"
    assert expected in event.message


def test_an_fp16_overflow_in_the_forward_pass_is_precision() -> None:
    event = _first_fault("precision", plugins=[MixedPrecision("16-mixed", "cpu")])
    replay = event.extra["replay"]
    assert (replay["verdict"], replay["forward_origin"], replay["input_nonfinite"]) == ("precision", "gain", False)
    assert "Replay: precision (reproduces in reduced precision, finite in float32)" in event.message


def test_a_replay_that_raises_is_reported_and_the_run_goes_on() -> None:
    event = _first_fault("raises")
    assert event.extra["replay"]["verdict"] == "replay failed: RuntimeError: the batch's iterator is exhausted"
    assert "Replay: replay failed: RuntimeError" in event.message


class Carried(pl.LightningModule):
    """Truncated BPTT; at step 3 the carried hidden state is poisoned (NaN)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.hidden: Tensor | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.trainer.global_step == 3:
            self.hidden = torch.full((1, x.shape[0], 8), math.nan)
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = hidden.detach()
        return nn.functional.mse_loss(self.head(out[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 5, 3, generator=g), torch.randn(32, 1, generator=g)), 4)


def test_a_poisoned_carried_state_names_the_rnn_with_a_nonfinite_input() -> None:
    guard = GradGuard(log_every_n_steps=2, max_consecutive_skips=100)
    model = Carried()
    trainer([guard], steps=5).fit(model)
    event = next(e for e in guard.events if e.kind == "nonfinite")
    print(event.message)
    replay = event.extra["replay"]
    assert (replay["verdict"], replay["forward_origin"], replay["input_nonfinite"]) == ("data or numerics", "rnn", True)
    expected = "first went non-finite in rnn (its input was already non-finite: the data or a carried state)"
    assert expected in event.message


class ManualNet(pl.LightningModule):
    """Manual optimization, with a NaN written into l1's gradient at step 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.l0, self.l1 = nn.Linear(4, 8), nn.Linear(8, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        h = self.l1(torch.tanh(self.l0(x)))
        if self.trainer.global_step == 2:
            h = poison(h, math.nan)
        self.manual_backward(nn.functional.mse_loss(h, y))
        opt.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(TensorDataset(torch.rand(32, 4), torch.rand(32, 1)), batch_size=4)


def test_no_replay_under_manual_optimization_says_why_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard()
    with caplog.at_level(logging.INFO):
        trainer([guard], steps=4).fit(ManualNet())
    said = [r.getMessage() for r in caplog.records if "are not replayed" in r.getMessage()]
    assert said == [
        "GradGuard: faults are not replayed in this run: under manual optimization training_step steps the "
        "optimizers itself, so running it again on one step's batch would train; the fault's layers and "
        "backward origin are still reported"
    ]
    (event,) = guard.events
    assert (event.step, event.origin) == (2, "l1") and "replay" not in event.extra


def test_no_replay_under_a_sharded_strategy_says_why() -> None:
    """The real strategies, as the Trainer builds them (no fit needed to ask). FSDPStrategy (FSDP1)
    cannot be built without CUDA: its case runs in tests/integrations/test_rollback_distributed.py's
    CUDA cases and benchmarks/gpu_checks.py."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_gradguard.integrations.lightning.replay import why_no_replay

    def why(**kwargs: Any) -> str | None:
        t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, **kwargs)
        return why_no_replay(t, Net("data"))

    assert why() is None and why(strategy="ddp") is None
    assert str(why(strategy=ModelParallelStrategy())).startswith(
        "under ModelParallelStrategy the forward pass gathers the shards with collectives"
    )


class Recurrence(pl.LightningModule):
    """Truncated BPTT through a ReLU RNN whose recurrence doubles the hidden state at each timestep (the
    word language model's RNN_RELU at lr 20, in miniature): the carried state grows ~1000x per batch,
    finite, until the RNN's own recurrence overflows from finite inputs. ``self.hidden`` is reassigned
    in ``training_step``, so when the guard replays that step the attribute already holds its non-finite
    result."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 8, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_ih_l0.fill_(0.1)
            self.rnn.weight_hh_l0.copy_(2 * torch.eye(8))
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
        self.head = nn.Linear(8, 1)
        self.hidden: Tensor | None = None
        self.hidden_finite_before: dict[int, bool] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.hidden is not None:
            self.hidden_finite_before.setdefault(self.trainer.global_step, bool(torch.isfinite(self.hidden).all()))
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = hidden.detach()
        last = out[:, -1]
        return nn.functional.mse_loss(self.head(last / last.norm(dim=1, keepdim=True)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.rand(64, 10, 3, generator=g), torch.randn(64, 1, generator=g)), 4)


def test_a_recurrence_that_overflows_from_finite_inputs_names_the_rnn_with_a_finite_input() -> None:
    guard = GradGuard(log_every_n_steps=2, max_consecutive_skips=100)
    model = Recurrence()
    trainer([guard], steps=16).fit(model)
    event = next(e for e in guard.events if e.kind == "nonfinite")
    print(event.message)
    assert model.hidden_finite_before[event.step]  # the state the faulty step began with was finite ...
    assert not torch.isfinite(model.hidden).all()  # ... and the step replaced it with its non-finite result
    replay = event.extra["replay"]
    assert (replay["verdict"], replay["forward_origin"], replay["input_nonfinite"]) == (
        "data or numerics", "rnn", False,
    )  # fmt: skip
    assert "the forward pass first went non-finite in rnn." in event.message


class Everything(pl.LightningModule):
    """What a replay must leave as it found it: dropout (the RNG), a carried hidden state and a counter
    (reassigned attributes), ``self.log`` on step and on epoch (the logged metrics), Adam's state. A NaN
    written into the GRU's gradient once, at step 3, makes the guard replay that step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 1)
        self.hidden: Tensor | None = None
        self.calls = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.calls += 1
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = hidden.detach()
        if self.trainer.global_step == 3:
            out = once(out)
        loss = nn.functional.mse_loss(self.head(self.drop(out[:, -1])), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log_dict({"hidden_norm": self.hidden.norm()}, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(24, 5, 3, generator=g), torch.randn(24, 1, generator=g)), 4)


def test_a_replay_changes_nothing_a_run_without_replay_would_not() -> None:
    """replay=True and replay=False give the same run, bit for bit: weights, optimizer state, the RNG
    afterwards, every logged metric (the guard's and the module's own), the carried state."""
    from tests.helpers import MemoryLogger, assert_same_state

    runs = {}
    for replay in (True, False):
        Once.reset()
        torch.manual_seed(123)
        model, logger = Everything(), MemoryLogger()
        guard = GradGuard(log_every_n_steps=1, replay=replay)
        t = trainer([guard], steps=10, logger=logger, log_every_n_steps=1)
        t.fit(model)
        runs[replay] = (model, t, logger, guard, torch.get_rng_state())
    (m1, t1, l1, g1, rng1), (m0, t0, l0, g0, rng0) = runs[True], runs[False]
    assert "replay" in g1.events[0].extra and "replay" not in g0.events[0].extra  # one replayed, one not
    assert_same_state(m1.state_dict(), m0.state_dict())
    assert_same_state(t1.optimizers[0].state_dict(), t0.optimizers[0].state_dict())
    assert torch.equal(rng1, rng0)  # the replay restored the RNG stream it borrowed
    assert m1.hidden is not None and m0.hidden is not None and torch.equal(m1.hidden, m0.hidden)
    assert m1.calls == m0.calls == 10
    assert _nan_safe(l1.rows) == _nan_safe(l0.rows)  # every logged value, the module's own included
    assert _nan_safe(dict(t1.callback_metrics)) == _nan_safe(dict(t0.callback_metrics))


def _nan_safe(value: Any) -> Any:
    """Plain values in which NaN compares equal to NaN (the faulty step logs NaN norms)."""
    if isinstance(value, dict):
        return {k: _nan_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_safe(v) for v in value]
    if isinstance(value, Tensor):
        value = float(value)
    return "nan" if isinstance(value, float) and math.isnan(value) else value
