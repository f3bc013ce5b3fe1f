"""Per-timestep tracking inside a real Lightning run, read back from TensorBoard."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_gradguard import GradGuard
from tests.helpers import trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from vanishing_gradients import SequenceClassifier, long_range_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_heatmap_and_scalars_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    guard = GradGuard(log_every_n_steps=2, images_in_background=False)
    model = SequenceClassifier("lstm")
    data = DataLoader(long_range_data(256, seed=0), batch_size=32)
    trainer([guard], steps=4, logger=[tb]).fit(model, data)
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for key in ("first_last_ratio", "decay_per_step", "horizon"):
        assert f"gradguard/timestep/rnn/{key}" in scalars
    logged = [e.value for e in acc.Scalars("gradguard/timestep/rnn/first_last_ratio")]
    profile = guard.core.timestep_norms["rnn"]
    assert profile.shape == (50,)
    assert logged[-1] == pytest.approx(float(profile[0] / profile[-1]), rel=1e-5)
    images = acc.Images("gradguard/timestep/rnn")
    assert [im.step for im in images] == [1, 3]
    assert images[-1].width > 100 and images[-1].height > 100


def test_vanilla_rnn_vanishes_lstm_much_less() -> None:
    ratios = {}
    for cell in ("rnn", "lstm"):
        guard = GradGuard(log_every_n_steps=5)
        data = DataLoader(long_range_data(640, seed=0), batch_size=64)
        trainer([guard], steps=10).fit(SequenceClassifier(cell), data)
        ratios[cell] = guard.core.timestep_summaries["rnn"]["first_last_ratio"]
    assert ratios["rnn"] < 1e-4
    assert ratios["lstm"] >= 100 * ratios["rnn"]
    assert torch.isfinite(torch.tensor(list(ratios.values()))).all()
