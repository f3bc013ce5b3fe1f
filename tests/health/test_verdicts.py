"""The verdict on real runs: healthy clipped runs are healthy, a NaN loss is not an explosion, a true
explosion is caught, the guard's own stop leads the verdict, and every judge agrees with the live guard."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning, NonFiniteGradientError, NormClip
from lightning_gradguard.cli import main as report_main
from tests.helpers import FaultNet, trainer
from tests.tensorboard.test_tab import _plugin_for

FINDING_OF = {"spike": "spiky"}  # the event kind -> the finding kind `--fail-on` names


def _fit(tmp_path: Path, name: str, model: pl.LightningModule, steps: int, **options: Any) -> GradGuard:
    guard = GradGuard(log_every_n_steps=1, images=False, **options)
    logger = TensorBoardLogger(tmp_path, name=name, version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=steps, logger=logger).fit(model)
    return guard


def _cli(logdir: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = report_main(["report", str(logdir), "--json", *extra])
    (run,) = json.loads(out.getvalue())
    return status, run


def _tab(logdir: Path, run: str) -> dict[str, Any]:
    from tensorboard import context

    return _plugin_for(logdir).report(context.RequestContext(), "", run)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ example 1: healthy, clipped
class LSTMLanguageModel(pl.LightningModule):
    """A 2-layer LSTM language model on synthetic Zipf-distributed tokens, trained as the PTB recipe
    does: SGD at a high learning rate, the gradient clipped to 0.25. The guard raises no event on it;
    0.2.0's report called it "unhealthy: gradient spikes in rnn.l1" (a per-layer 10x rule of its own)."""

    def __init__(self, vocab: int = 200, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.vocab = vocab

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.head(self.rnn(self.embed(x))[0])
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=20.0)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        zipf = 1.0 / torch.arange(1, self.vocab + 1).float()  # word frequencies, as in text
        tokens = torch.multinomial(zipf, 16 * 120 * 21, replacement=True, generator=g).reshape(16 * 120, 21)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16)


def test_a_healthy_clipped_lstm_language_model_is_healthy(tmp_path: Path) -> None:
    guard = _fit(tmp_path, "lm", LSTMLanguageModel(), 120, clip=NormClip(max_norm=0.25))
    assert guard.events == [] and guard.clipped_steps > 0
    status, rep = _cli(tmp_path, "--fail-on", "spiky", "exploding")
    assert status == 0
    assert rep["verdict"].startswith("healthy") and rep["severity"] in ("healthy", "healthy with notes")
    assert rep["findings"] == [] and all(row["flags"] == [] for row in rep["layers"].values())
    if rep["severity"] == "healthy with notes":  # the clipper at work is named, with its fraction
        assert any("NormClip(max_norm=0.25" in note and "%" in note for note in rep["notes"])
    assert _tab(tmp_path, "lm")["verdict"] == rep["verdict"]


# ------------------------------------------------------------------------------ example 2: a forward overflow
class OverflowingRNN(pl.LightningModule):
    """An RNN whose forward pass overflows from step ``from_step`` on: the loss is non-finite, so every
    gradient is NaN, while no gradient ever grew."""

    def __init__(self, from_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.from_step = from_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = self.rnn(x)[0][:, -1]
        if self.trainer.global_step >= self.from_step:
            h = h * torch.exp(torch.full_like(h, 200.0))  # exp(200) overflows float32
        return nn.functional.mse_loss(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 12, 3, generator=g), torch.randn(256, 1, generator=g)), 8)


def test_a_nan_loss_from_a_forward_overflow_is_not_called_exploding_gradients(tmp_path: Path) -> None:
    guard = _fit(tmp_path, "overflow", OverflowingRNN(from_step=10), 20)
    assert {e.origin for e in guard.events if e.kind == "nonfinite"} == {"loss"}
    status, rep = _cli(tmp_path)
    assert status == 1 and rep["nonfinite_steps"] == 10
    assert all("exploding" not in row["flags"] for row in rep["layers"].values())
    assert [f["kind"] for f in rep["findings"]] == ["nonfinite"]
    (finding,) = rep["findings"]
    assert "the loss was non-finite at steps 10, 11, 12, 13, 14 and 5 more" in finding["what"]
    assert "not a gradient explosion" in finding["what"]
    assert "NormClip" not in finding["advice"] and "clipping gradients cannot cure it" in finding["advice"]
    assert rep["verdict"].startswith("unhealthy: 10 non-finite steps")


# ------------------------------------------------------------------------------ a true explosion
class Burst(FaultNet):
    """FaultNet whose layer ``l1`` alone gets a gradient x1e4 at one step."""

    def __init__(self, at: int) -> None:
        super().__init__(optim="sgd")
        self.at = at
        self.l1.weight.register_hook(lambda g: g * 1e4 if self.trainer.global_step == self.at else g)


@pytest.mark.parametrize(("clip", "severity"), [(None, "unhealthy"), (NormClip(max_norm=1.0), "attention")])
def test_a_true_explosion_at_one_layer_is_caught_and_named(tmp_path: Path, clip: Any, severity: str) -> None:
    guard = _fit(tmp_path, "burst", Burst(at=30), 40, clip=clip, spike_warmup=10)
    live = [e for e in guard.events if e.kind == "spike"]
    assert [(e.step, e.origin) for e in live] == [(30, "l1")]
    status, rep = _cli(tmp_path, "--fail-on", "spiky")
    assert status == 1
    (finding,) = [f for f in rep["findings"] if f["kind"] == "spiky"]
    assert "at step 30 in l1" in finding["what"] and finding["severity"] == severity
    assert rep["severity"] == severity and rep["verdict"].startswith(severity)
    assert rep["layers"]["l1"]["flags"] == ["spiky"]
    if clip is None:  # the advice shows why: the norm's own distribution
        assert "NormClip(max_norm=" in finding["advice"] and "99th percentile" in finding["advice"]
    else:
        assert "clipped by NormClip(max_norm=1.0" in finding["what"]
    tab = _tab(tmp_path, "burst")
    assert (tab["verdict"], tab["severity"], tab["findings"]) == (rep["verdict"], rep["severity"], rep["findings"])


# ------------------------------------------------------------------------------ one judgement everywhere
FAULTS: dict[str, dict[int, tuple[Any, ...]]] = {
    "nan-grad-l1": {6: ("grad", 1, math.nan)},
    "inf-grad-l0": {6: ("grad", 0, math.inf)},
    "nan-loss": {6: ("loss", math.nan)},
    "nan-input": {6: ("input", math.nan)},
    "clean": {},
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_report_finds_what_the_live_guard_raised_kind_for_kind(tmp_path: Path, fault: str) -> None:
    guard = _fit(tmp_path, fault, FaultNet(FAULTS[fault]), 12, spike_warmup=3)
    live = {FINDING_OF.get(e.kind, e.kind) for e in guard.events}
    status, rep = _cli(tmp_path)
    assert {f["kind"] for f in rep["findings"]} == live
    assert status == (1 if "nonfinite" in live else 0)
    tab = _tab(tmp_path, fault)
    assert (tab["verdict"], tab["nonfinite_steps"], tab["events"]) == (rep["verdict"], rep["nonfinite_steps"],
                                                                       len(guard.events))  # fmt: skip


# ------------------------------------------------------------------------------ a run the guard stops
def test_a_run_the_guard_stops_leads_with_the_stop_and_loses_no_event(tmp_path: Path) -> None:
    faults = {s: ("loss", math.nan) for s in range(3, 60)}  # the loss stays non-finite from step 3
    guard = GradGuard(log_every_n_steps=5, images=False)
    logger = TensorBoardLogger(tmp_path, name="stopped", version="")
    with warnings.catch_warnings(), pytest.raises(NonFiniteGradientError, match="25 consecutive"):
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=60, logger=logger, log_every_n_steps=5).fit(FaultNet(faults))
    last = 3 + 25 - 1
    assert [e.kind for e in guard.events][-2:] == ["nonfinite", "stopped"] and guard.events[-1].step == last

    status, rep = _cli(tmp_path)
    assert status == 1
    assert [row["step"] for row in rep["nonfinite"]] == list(range(3, last + 1))  # every one, the last included
    assert rep["nonfinite_steps"] == 25 and rep["event_count"] == len(guard.events) == 26
    assert rep["findings"][0]["kind"] == "stopped"
    assert rep["verdict"].startswith(f"stopped by GradGuard at step {last}: 25 consecutive skipped steps")
    assert rep["verdict"].count(f"at step {last}") == 1  # said once, not "...: GradGuard stopped the run at step"
    assert "max_consecutive_skips=25" in rep["verdict"] and "origin 'loss'" in rep["verdict"]
    tab = _tab(tmp_path, "stopped")
    assert (tab["verdict"], tab["nonfinite_steps"], tab["events"]) == (rep["verdict"], 25, 26)
