"""The judgement of a run, from what it logged: by the thresholds the run was guarded with."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from lightning_gradguard import GradGuard, GradGuardWarning
from lightning_gradguard.cli import main as report_main
from lightning_gradguard.health.judge import RunData, judge_run
from tests.helpers import FaultNet, scale_grad, trainer
from tests.tensorboard.test_tab import _plugin_for


class QuietLayer(FaultNet):
    """FaultNet whose first layer's gradient is scaled down to about 5e-7: between 1e-8 and 1e-6."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l0(x))
        h = scale_grad(h, 3e-7)
        h = torch.tanh(self.l1(h))
        return self.l2(h)  # type: ignore[no-any-return]


def _cli(logdir: Path) -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = report_main(["report", str(logdir), "--json"])
    return status, json.loads(out.getvalue())


def test_a_run_is_judged_by_the_vanish_threshold_it_was_guarded_with(tmp_path: Path) -> None:
    guard = GradGuard(vanish_threshold=1e-6, log_every_n_steps=1, images=False, spike_zscore=None)
    logger = TensorBoardLogger(tmp_path, name="quiet", version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=8, logger=logger).fit(QuietLayer())
    live = [e for e in guard.events if e.kind == "vanishing"]
    assert live and live[0].layers == ("l0",)
    assert 1e-8 < live[0].value < 1e-6  # the layer sits between the default threshold and the run's own

    status, (rep,) = _cli(tmp_path)
    assert rep["layers"]["l0"]["flags"] == ["vanishing"]
    assert rep["layers"]["l1"]["flags"] == rep["layers"]["l2"]["flags"] == []
    assert [f["kind"] for f in rep["findings"]] == ["vanishing"] and status == 0

    from tensorboard import context

    tab = _plugin_for(tmp_path).report(context.RequestContext(), "", "quiet")
    assert tab["healthy"] is False and tab["verdict"] == rep["verdict"]
    assert [f["kind"] for f in tab["findings"]] == ["vanishing"]


@pytest.mark.parametrize(("config", "flagged"), [({}, False), ({"vanish_threshold": 1e-6}, True)])
def test_files_without_a_recorded_threshold_fall_back_to_the_default(config: dict[str, Any], flagged: bool) -> None:
    data = RunData(scalars={"gradguard/layer/a": [(s, 5e-7) for s in range(4)]}, config=config)
    assert ("vanishing" in judge_run("run", data).layers["a"]["flags"]) is flagged
