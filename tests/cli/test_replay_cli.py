"""``gradguard replay DUMP --model MODULE:FACTORY``: the live guard's attribution, offline, on a dump."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.cli import main
from tests.helpers import trainer

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")


class Log(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x)


class DataNet(pl.LightningModule):
    """Batch 2 holds a negative value under a log: NaN from the data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.log_layer, self.head = nn.Linear(3, 4), Log(), nn.Linear(4, 1)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.log_layer(torch.sigmoid(self.enc(x)) + x[:, :1])), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(32, 3, generator=g), torch.randn(32, 1, generator=g)
        x[2 * 4, 0] = -3.0
        return DataLoader(TensorDataset(x, y), batch_size=4)


def build() -> DataNet:
    """The factory ``--model tests.cli.test_replay_cli:build`` names."""
    return DataNet()


def test_replay_of_a_dump_finds_the_data_fault_and_its_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = GradGuard(dump_dir=str(tmp_path / "dumps"), log_every_n_steps=1)
    trainer([guard], steps=4, default_root_dir=str(tmp_path)).fit(DataNet())
    (dump,) = guard.dumps
    capsys.readouterr()
    assert main(["replay", dump, "--model", "tests.cli.test_replay_cli:build"]) == 1  # it reproduces
    out = capsys.readouterr().out
    assert "step 2 (nonfinite)" in out
    assert "Replay: data or numerics (reproduces in float32); the forward pass first went non-finite in log_layer" in (
        out
    )
    assert main(["replay", dump, "--model", "tests.cli.test_replay_cli:build", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["verdict"], result["forward_origin"], result["step"]) == ("data or numerics", "log_layer", 2)
    # the live guard said the same
    live = next(e for e in guard.events if e.kind == "nonfinite").extra["replay"]
    assert (live["verdict"], live["forward_origin"]) == (result["verdict"], result["forward_origin"])


def test_replay_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "missing.pt"), "--model", "tests.cli.test_replay_cli:build"]) == 2
    assert "cannot read the dump" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing.pt"), "--model", "nomodule"]) == 2
