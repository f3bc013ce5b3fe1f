"""``gradguard replay DUMP --model MODULE:FACTORY``: the live guard's attribution, offline, on a dump."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.cli import main
from lightning_gradguard.dump import load_dump
from tests.helpers import FaultNet, trainer

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


class StepNet(FaultNet):
    """A fault that depends on the trainer's state: the gradient at l1's output is NaN at global_step 2.
    A dump holds the batch, the weights and the RNG state, not the trainer: offline, the step is finite."""

    def __init__(self) -> None:
        super().__init__({2: ("grad", 1, math.nan)}, optim="sgd")


def test_an_offline_replay_that_does_not_reproduce_names_what_the_dump_lacks_not_the_hardware(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = GradGuard(dump_dir=str(tmp_path / "dumps"), log_every_n_steps=1, images=False)
    trainer([guard], steps=4, default_root_dir=str(tmp_path)).fit(StepNet())
    (dump,) = guard.dumps
    live = next(e for e in guard.events if e.kind == "nonfinite").extra["replay"]
    assert live["verdict"] == "data or numerics"  # live, global_step is 2 again during the replay
    capsys.readouterr()
    said = (
        "Replay: did not reproduce offline (2 replays of the dump's batch, weights and RNG state): the fault may "
        "depend on state the dump does not hold (trainer state such as global_step, a state the module carries "
        "between steps, the data pipeline); if the run used autocast, also replay with --precision bf16 or fp16"
    )
    live_said = "The live replay said: data or numerics (reproduces in float32)."
    assert main(["replay", dump, "--model", "tests.cli.test_replay_cli:StepNet"]) == 0  # finite here
    out = capsys.readouterr().out
    assert out == f"step 2 (nonfinite), {dump}: {said}. {live_said}\n"  # the dump's event carries the live verdict
    assert "hardware" not in out and "transient" not in out
    assert main(["replay", dump, "--model", "tests.cli.test_replay_cli:StepNet", "--precision", "bf16"]) == 0
    assert f"the data pipeline). {live_said}\n" in capsys.readouterr().out  # no autocast hint: replayed under one
    assert main(["replay", dump, "--model", "tests.cli.test_replay_cli:StepNet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["verdict"], result["replays"], result["step"]) == ("transient", 2, 2)
    assert result["live_replay"] == live

    # An older dump, whose event does not carry the live verdict: the offline result alone.
    payload = load_dump(dump)
    del payload["event"]["extra"]["replay"]
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    assert main(["replay", str(older), "--model", "tests.cli.test_replay_cli:StepNet"]) == 0
    assert capsys.readouterr().out == f"step 2 (nonfinite), {older}: {said}.\n"
    assert main(["replay", str(older), "--model", "tests.cli.test_replay_cli:StepNet", "--json"]) == 0
    assert "live_replay" not in json.loads(capsys.readouterr().out)


MYMOD = '''
import torch
from torch import nn


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class Net(nn.Module):  # DataNet's layers and training_step, in a module of the working directory
    def __init__(self):
        super().__init__()
        self.enc, self.log_layer, self.head = nn.Linear(3, 4), Log(), nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.log_layer(torch.sigmoid(self.enc(x)) + x[:, :1])), y)


def build():
    return Net()
'''


def test_the_console_script_imports_the_model_from_the_working_directory(tmp_path: Path) -> None:
    """``gradguard replay DUMP --model mymod:build`` in the folder holding ``mymod.py``, as ``python -m
    lightning_gradguard replay`` finds it: the console script puts the working directory on the path."""
    guard = GradGuard(dump_dir=str(tmp_path / "dumps"), log_every_n_steps=1, images=False)
    trainer([guard], steps=4, default_root_dir=str(tmp_path)).fit(DataNet())
    (dump,) = guard.dumps
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymod.py").write_text(MYMOD)
    script = Path(sys.executable).with_name("gradguard")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the script itself puts on the path
    for command in ([str(script)], [sys.executable, "-m", "lightning_gradguard"]):
        proc = subprocess.run([*command, "replay", dump, "--model", "mymod:build"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 1, (command, proc.stderr)  # it reproduces
        said = "Replay: data or numerics (reproduces in float32); the forward pass first went non-finite in log_layer"
        assert said in proc.stdout
