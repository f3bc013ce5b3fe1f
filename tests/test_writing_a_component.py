"""The extension point keeps its promises: the component of docs/writing-a-component.md, run as it
stands there, measures on the device in the step's one read, skips a step on its own device-side
condition, keeps its state through a checkpoint, and reports an event that reaches TensorBoard and
``gradguard report``."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_gradguard import GradGuard, GradGuardWarning, GuardComponent, GuardCore
from lightning_gradguard.cli import main as gradguard
from lightning_gradguard.tensorboard.eventfile import read_run
from tests.helpers import FaultNet, assert_same_state, snapshot, trainer
from tests.hostreads import host_reads

PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-component.md"


def _page() -> dict[str, Any]:
    """The page's example, run as it stands (its own plain loop included)."""
    text = PAGE.read_text()
    section = text[text.index("## A complete example") :]
    code = section[section.index("```python\n") + 10 : section.index("\n```", section.index("```python"))]
    scope: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, str(PAGE), "exec"), scope)
    scope["printed"] = out.getvalue()
    return scope


def test_the_page_s_loop_skips_the_wild_step_and_prints_what_it_says() -> None:
    scope = _page()
    assert scope["printed"] == "[('largest_gradient', 7, 'skipped')]\nTrue\n"
    assert isinstance(scope["component"], GuardComponent)


def test_it_reads_nothing_on_a_healthy_fused_step_and_skips_the_wild_one_bit_identically() -> None:
    largest = _page()["LargestGradient"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = GuardCore(model, components=[largest(limit=5.0)], log_every_n_steps=10)
    reads: list[int] = []
    for step in range(10):
        optimizer.zero_grad()
        y = torch.randn(16, 1) * (1000.0 if step == 7 else 1.0)
        torch.nn.functional.mse_loss(model(torch.randn(16, 4)), y).backward()
        before = snapshot(model, optimizer)
        with host_reads() as calls:
            guard.step(optimizer)
        reads.append(len(calls))
        optimizer.step()
        if step == 7:
            assert_same_state(snapshot(model, optimizer), before)  # skipped by the fused kernel itself
    assert reads == [0] * 9 + [1]  # the logging step 9 reads once, for itself and the deferred steps
    assert [(e.kind, e.step, e.action) for e in guard.events] == [("largest_gradient", 7, "skipped")]
    assert guard.skipped_steps == 1 and guard.policy.skipped_by == {"largest_gradient_over": 1}


def test_under_the_trainer_its_state_survives_a_checkpoint_and_its_event_reaches_tensorboard_and_the_report(
    tmp_path: Path,
) -> None:
    largest = _page()["LargestGradient"]

    def fit(steps: int, ckpt: Path | None = None) -> GradGuard:
        guard = GradGuard(components=[largest(limit=5.0)], log_every_n_steps=2, images=False)
        logger = TensorBoardLogger(tmp_path, name="run", version="resumed" if ckpt else "first")
        saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        callbacks: list[pl.Callback] = [guard, saving]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradGuardWarning)
            t = trainer(callbacks, steps=steps, logger=logger, enable_checkpointing=True)
            t.fit(FaultNet({5: ("loss", 1000.0)}), ckpt_path=ckpt)
        return guard

    first = fit(8)
    (event,) = [e for e in first.events if e.kind == "largest_gradient"]
    assert (event.step, event.action) == (5, "skipped") and event.value > 5.0
    state = first.state_dict()["components"]["largest_gradient"]
    assert 0 < state["largest_seen"] < 5.0  # the wild step was skipped: not a value it kept
    ckpt = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    (saved,) = [v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("GradGuard")]
    assert saved["components"]["largest_gradient"] == state  # in the Lightning checkpoint, by name
    loaded: list[float] = []

    class Loaded(pl.Callback):  # listed after the guard: what the resumed component starts from
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            loaded.append(trainer.callbacks[0].component("largest_gradient").largest_seen)  # type: ignore[attr-defined]

    guard = GradGuard(components=[largest(limit=5.0)], log_every_n_steps=2, images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard, Loaded()], steps=10, logger=False).fit(FaultNet({5: ("loss", 1000.0)}), ckpt_path=ckpt)
    assert loaded == [state["largest_seen"]]
    data = read_run(tmp_path / "run" / "first")
    assert [(e["kind"], e["step"]) for e in data.events] == [("largest_gradient", 5)]
    assert [s for s, _ in data.scalars["gradguard/largest_gradient"]] == [1, 3, 5, 7]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = gradguard(["report", str(tmp_path / "run" / "first"), "--json"])
    (report,) = json.loads(out.getvalue())
    (finding,) = [f for f in report["findings"] if f["kind"] == "largest_gradient"]
    assert status == 0 and finding["severity"] == "attention"
    assert "1 largest_gradient event at step 5" in finding["what"]
    assert report["skipped_steps"] == 1
