"""The checkpoint gate under a real Trainer with the user's own ``ModelCheckpoint``: no non-finite or
undone state written, a deferred save written once healthy, the last healthy checkpoint kept by the
rotation, a quarantine after a rollback, a resume from a poisoned checkpoint refused, and ``gradguard
check`` on every kind of checkpoint. Distributed runs: ``test_checkpoints_distributed.py``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_gradguard import Checkpoints, GradGuard, GuardCore, Rollback
from lightning_gradguard.cli import main as cli_main
from lightning_gradguard.core.checkpoints import HEALTH_KEY, INDEX_FILE
from lightning_gradguard.errors import GradGuardError
from tests.helpers import FaultNet, trainer
from tests.integrations.test_rollback import LRBurst, Regression

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")


def _ckpt_steps(directory: Path, pattern: str = "*.ckpt") -> list[int]:
    """The steps of the checkpoints in ``directory`` (named ``epoch=E-step=S.ckpt``), in order."""
    return sorted(int(m.group(1)) for p in directory.glob(pattern) if (m := re.search(r"step=(\d+)", p.name)))


def _finite(path: Path) -> bool:
    ckpt = torch.load(path, weights_only=False)
    tensors = list(ckpt["state_dict"].values())
    tensors += [v for opt in ckpt["optimizer_states"] for s in opt["state"].values() for v in s.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


def _fit(guard: GradGuard, saving: ModelCheckpoint, model: pl.LightningModule, steps: int, **kw: Any) -> pl.Trainer:
    t = trainer([guard, saving], steps=steps, enable_checkpointing=True, **kw)
    t.fit(model)
    return t


# ---------------------------------------------------------------------------- non-finite weights
def test_nan_weights_under_warn_are_never_saved_and_the_rotation_keeps_the_last_healthy(tmp_path: Path) -> None:
    # on_nonfinite="warn": the NaN gradient of step 3 reaches AdamW, every weight is NaN from then on.
    guard = GradGuard(on_nonfinite="warn", log_every_n_steps=4)
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1)  # keeps the newest only
    _fit(guard, saving, FaultNet({3: ("grad", 1, math.nan)}), steps=8)
    assert _ckpt_steps(tmp_path) == [2]  # 4, 6, 8 held NaN weights: not written, and 2 was not rotated out
    assert _finite(tmp_path / "epoch=0-step=2.ckpt")
    deferred = [e for e in guard.events if e.kind == "checkpoint"]
    assert [(e.step, e.action) for e in deferred] == [(4, "deferred"), (6, "deferred"), (8, "deferred")]
    assert "non-finite weights or optimizer state: l0.weight" in deferred[0].message
    assert "It is saved at the next healthy step." in deferred[0].message
    assert saving.best_model_path.endswith("epoch=0-step=2.ckpt")  # the callback was not told of a ghost
    index = json.loads((tmp_path / INDEX_FILE).read_text())["checkpoints"]
    assert [(Path(r["path"]).name, r["healthy"]) for r in index] == [("epoch=0-step=2.ckpt", True)]


def test_a_deferred_save_is_written_at_the_next_healthy_step(tmp_path: Path) -> None:
    # Steps 4 and 5 are skipped (NaN gradients): at the save of step 6 the guard has a streak of two
    # skipped steps, a state it does not keep; step 6 is healthy and its state is saved at step 7.
    guard = GradGuard(log_every_n_steps=4)
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)
    _fit(guard, saving, FaultNet({4: ("grad", 1, math.nan), 5: ("grad", 1, math.nan)}), steps=9)
    assert _ckpt_steps(tmp_path, "epoch=*") == [3, 7, 9]
    (event,) = [e for e in guard.events if e.kind == "checkpoint"]
    assert (event.step, event.action, event.extra["why"]) == (6, "deferred", ["the last 2 steps were skipped"])
    assert guard.component("checkpoints").pending is None
    record = torch.load(tmp_path / "epoch=0-step=7.ckpt", weights_only=False)[HEALTH_KEY]
    assert record == {"step": 7, "healthy": True, "why": [], "last_rollback": None, "version": record["version"]}


def test_with_defer_off_an_unhealthy_save_is_skipped_and_recorded(tmp_path: Path) -> None:
    guard = GradGuard(log_every_n_steps=4, checkpoints=Checkpoints(defer=False))
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    _fit(guard, saving, FaultNet({4: ("grad", 1, math.nan), 5: ("grad", 1, math.nan)}), steps=9)
    assert _ckpt_steps(tmp_path) == [3, 9]
    (event,) = [e for e in guard.events if e.kind == "checkpoint"]
    assert (event.step, event.action) == (6, "skipped") and "It is skipped (defer=False)." in event.message


def test_checkpoints_none_leaves_model_checkpoint_alone(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="warn", log_every_n_steps=4, checkpoints=None)
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(guard, saving, FaultNet({3: ("grad", 1, math.nan)}), steps=6)
    assert _ckpt_steps(tmp_path) == [2, 4, 6] and not _finite(tmp_path / "epoch=0-step=6.ckpt")
    assert not (tmp_path / INDEX_FILE).exists()
    assert HEALTH_KEY not in torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)


def test_a_direct_save_of_an_unhealthy_state_is_written_marked_and_refused_at_resume(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="warn", log_every_n_steps=4)
    t = trainer([guard], steps=5, enable_checkpointing=False)
    t.fit(FaultNet({3: ("grad", 1, math.nan)}))
    with pytest.warns(UserWarning, match="trainer.save_checkpoint at step 5 keeps an unhealthy state"):
        t.save_checkpoint(tmp_path / "asked.ckpt")
    record = torch.load(tmp_path / "asked.ckpt", weights_only=False)[HEALTH_KEY]
    assert record["healthy"] is False and record["why"][0].startswith("non-finite weights")


# ---------------------------------------------------------------------------- a rollback
@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradGuard]:
    """The planted divergence of test_rollback (an lr x1000 burst at steps 150-152) under
    ``ModelCheckpoint(every_n_train_steps=5, save_last=True, save_top_k=-1)``: a rollback at 153 to 140."""
    root = tmp_path_factory.mktemp("rolled")
    guard = GradGuard(log_every_n_steps=10, spike_warmup=20,
                      rollback=Rollback(every=20, spike_zscore=6.0, spike_patience=3, skip_file=False))  # fmt: skip
    saving = ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_last=True, save_top_k=-1)
    t = trainer([LRBurst(), guard, saving], steps=200, enable_checkpointing=True, default_root_dir=str(root))
    t.fit(Regression())
    return root, guard


def test_a_rollback_quarantines_the_checkpoints_of_the_undone_interval(rolled_back: tuple[Path, GradGuard]) -> None:
    root, guard = rolled_back
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    start, snap = event.extra["from_step"], event.extra["snapshot_step"]
    assert snap < 150 < start  # back to before the burst
    undone = [s for s in range(5, 201, 5) if snap < s <= start]
    assert undone  # the test means something: checkpoints were written in the undone interval
    kept = _ckpt_steps(root, "epoch=*.ckpt")
    assert kept == [s for s in range(5, 201, 5) if s not in undone]  # none in (S, F], the rest all there
    assert _ckpt_steps(root, "*.ckpt.quarantined") == undone
    names = [f"epoch=2-step={s}.ckpt" for s in undone]
    assert event.extra["quarantined"] == [*names, f"last.ckpt -> epoch=2-step={snap}.ckpt"]
    assert f"quarantined the checkpoints it undid: {', '.join(names)}" in event.message
    last = torch.load(root / "last.ckpt", weights_only=False)
    assert last["global_step"] == 200 and _finite(root / "last.ckpt")  # from the final state
    assert last[HEALTH_KEY]["last_rollback"] == {"from_step": start, "snapshot_step": snap}


def test_gradguard_check_on_healthy_quarantined_and_poisoned_checkpoints(
    rolled_back: tuple[Path, GradGuard], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = rolled_back
    assert cli_main(["check", str(root / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "last.ckpt: healthy (lightning checkpoint, step 200, " in out and "after the rollback from step" in out
    quarantined = next(root.glob("*.quarantined"))
    assert cli_main(["check", str(quarantined), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["healthy"] is False and row["nonfinite"] == [] and "quarantined after a rollback" in row["problems"][0]
    ckpt = torch.load(root / "epoch=3-step=200.ckpt", weights_only=False)
    ckpt["state_dict"]["net.2.weight"][0, 3] = math.nan
    ckpt["optimizer_states"][0]["state"][1]["exp_avg_sq"][:2] = math.inf
    torch.save(ckpt, tmp_path / "poisoned.ckpt")
    assert cli_main(["check", str(tmp_path / "poisoned.ckpt"), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["nonfinite"] == [
        {"name": "state_dict.net.2.weight", "count": 1}, {"name": "optimizer_states[0].state.1.exp_avg_sq", "count": 2}
    ]  # fmt: skip
    assert row["format"] == "lightning" and row["step"] == 200


def test_gradguard_check_on_plain_and_distributed_state_dicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=tmp_path / "dcp-good")
    state["model"]["bias"][1] = math.nan
    dcp.save(state, checkpoint_id=tmp_path / "dcp-bad")
    assert cli_main(["check", str(tmp_path / "plain.pt"), str(tmp_path / "dcp-good")]) == 0
    assert "dcp-good: healthy (distributed checkpoint, 2 tensors checked)" in capsys.readouterr().out
    assert cli_main(["check", str(tmp_path / "dcp-bad"), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["format"] == "distributed" and row["nonfinite"] == [{"name": "model.bias", "count": 1}]
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    assert cli_main(["check", str(tmp_path / "junk.ckpt")]) == 2
    assert "UNREADABLE: cannot be read" in capsys.readouterr().out
    assert cli_main(["check", str(tmp_path / "missing.ckpt")]) == 2


# ---------------------------------------------------------------------------- a resume
@pytest.fixture
def poisoned(tmp_path: Path) -> Path:
    """Checkpoints of steps 2 and 4 (healthy, indexed), and a copy of step 4 with a NaN written into one
    weight by hand, beside them."""
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(GradGuard(log_every_n_steps=2), saving, FaultNet(), steps=4)
    ckpt = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=False)
    ckpt["state_dict"]["l1.weight"][2, 5] = math.nan
    torch.save(ckpt, tmp_path / "poisoned.ckpt")
    return tmp_path / "poisoned.ckpt"


def test_a_resume_from_a_poisoned_checkpoint_is_refused_naming_the_tensor_and_a_healthy_one(poisoned: Path) -> None:
    t = trainer([GradGuard(log_every_n_steps=2)], steps=6)
    with pytest.raises(GradGuardError) as info:
        t.fit(FaultNet(), ckpt_path=poisoned)
    message = str(info.value)
    assert "refuses to resume from poisoned.ckpt" in message
    assert "state_dict.l1.weight (1 non-finite value)" in message
    assert "The newest healthy checkpoint there is epoch=0-step=4.ckpt." in message
    assert "allow_unhealthy_resume=True" in message


def test_the_override_resumes_from_a_poisoned_checkpoint(poisoned: Path) -> None:
    guard = GradGuard(log_every_n_steps=2, on_nonfinite="warn", checkpoints=Checkpoints(allow_unhealthy_resume=True))
    t = trainer([guard], steps=6)
    t.fit(FaultNet(), ckpt_path=poisoned)
    assert t.global_step == 6


def test_a_resume_from_a_checkpoint_marked_unhealthy_is_refused(tmp_path: Path) -> None:
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(GradGuard(log_every_n_steps=2), saving, FaultNet(), steps=2)
    ckpt = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)
    ckpt[HEALTH_KEY] = {**ckpt[HEALTH_KEY], "healthy": False, "why": ["a rollback is pending (a test)"]}
    torch.save(ckpt, tmp_path / "marked.ckpt")
    with pytest.raises(GradGuardError, match=r"its health record says it is unhealthy \(a rollback is pending"):
        trainer([GradGuard(log_every_n_steps=2)], steps=4).fit(FaultNet(), ckpt_path=tmp_path / "marked.ckpt")


def test_a_healthy_checkpoint_resumes_and_the_gate_remembers_its_records(tmp_path: Path) -> None:
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(GradGuard(log_every_n_steps=2), saving, FaultNet(), steps=4)
    guard = GradGuard(log_every_n_steps=2)
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    t = trainer([guard, saving], steps=6, enable_checkpointing=True)
    t.fit(FaultNet(), ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    records = guard.component("checkpoints").records
    assert [r["step"] for r in records] == [2, 4, 6]  # the resumed guard's records, and the new save


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"quarantine": "hide"}, ValueError, "Expected `quarantine` to be one of 'rename', 'delete', but got 'hide'"),
        ({"suffix": ""}, ValueError, "Expected `suffix` to be a non-empty file-name suffix"),
        ({"suffix": "a/b"}, ValueError, "Expected `suffix` to be a non-empty file-name suffix"),
        ({"defer": "yes"}, TypeError, "Expected `defer` to be a bool, but got 'yes'"),
        ({"allow_unhealthy_resume": 1}, TypeError, "Expected `allow_unhealthy_resume` to be a bool, but got 1"),
    ],
)
def test_bad_checkpoints_arguments_are_refused_by_name(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Checkpoints(**kwargs)


def test_the_checkpoints_option_must_be_a_checkpoints() -> None:
    with pytest.raises(TypeError, match=r"Expected `checkpoints` to be a Checkpoints .* or None, but got 'rename'"):
        GuardCore(checkpoints="rename")  # type: ignore[arg-type]


def test_the_rotation_keeps_a_checkpoint_from_before_the_oldest_snapshot(tmp_path: Path) -> None:
    # save_top_k=1 keeps one checkpoint: the one of the undone interval would be the only one left,
    # and the rollback would quarantine it. The gate holds back the rotation of the newest checkpoint
    # from at or before each snapshot, until the snapshots move past a newer one.
    seen: dict[str, list[int]] = {}

    def on_rollback(event: Any) -> None:
        seen["at_rollback"] = _ckpt_steps(tmp_path, "epoch=*.ckpt")

    guard = GradGuard(log_every_n_steps=10, spike_warmup=20, on_rollback=on_rollback,
                      rollback=Rollback(every=20, spike_zscore=6.0, spike_patience=3, skip_file=False))  # fmt: skip
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=1)
    trainer([LRBurst(), guard, saving], steps=200, enable_checkpointing=True).fit(Regression())
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    snap = event.extra["snapshot_step"]
    assert [s for s in seen["at_rollback"] if s <= snap]  # a checkpoint to go back to, on disk
    assert _ckpt_steps(tmp_path, "epoch=*.ckpt") == [200]  # the held one released later: nothing piles up


class RollbackByHand(pl.Callback):
    """Calls ``guard.rollback()`` at the start of global step ``at`` (after the save of that step)."""

    def __init__(self, guard: GradGuard, at: int) -> None:
        self.guard, self.at = guard, at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            self.guard.rollback("a test")


@pytest.mark.parametrize("by_hand", [False, True])
def test_the_quarantine_takes_the_checkpoint_of_the_rollbacks_own_step(tmp_path: Path, by_hand: bool) -> None:
    # A checkpoint of global step c holds the updates of steps 0..c-1. NaN gradients at steps 5 and 6
    # (max_consecutive_skips=2) roll step 6 back to the snapshot of step 4: the checkpoints of steps 5
    # and 6 hold update 4, undone. By hand at the start of step 6: updates 4 and 5 are undone, the same
    # checkpoints. Monitored by "step" (mode max), the callback's best would be an undone one.
    guard = GradGuard(log_every_n_steps=4, max_consecutive_skips=2, rollback=Rollback(every=4, skip_file=False))
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, monitor="step", mode="max")
    faults = {} if by_hand else {5: ("grad", 1, math.nan), 6: ("grad", 1, math.nan)}
    callbacks: list[pl.Callback] = [RollbackByHand(guard, 6)] if by_hand else []
    trainer([*callbacks, guard, saving], steps=8, enable_checkpointing=True).fit(FaultNet(faults))
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    assert event.extra["snapshot_step"] == 4 and event.extra["from_step"] == (5 if by_hand else 6)
    assert event.extra["quarantined"] == ["epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt"]
    assert _ckpt_steps(tmp_path) == [1, 2, 3, 4, 7, 8]
    assert all(Path(p).exists() for p in saving.best_k_models)  # the callback forgot the quarantined
    assert saving.best_model_path.endswith("epoch=0-step=8.ckpt")


def test_the_screen_is_confirmed_finite_weights_whose_squares_overflow_are_healthy() -> None:
    from lightning_gradguard.core.checkpoints import CheckpointGate

    gate = CheckpointGate()
    gate.model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        gate.model.weight.fill_(1e30)  # finite; its 2-norm overflows float32
    assert gate.check(0, []).healthy
    with torch.no_grad():
        gate.model.bias[1] = math.inf
    verdict = gate.check(0, ["a test"])
    assert not verdict.healthy and verdict.bad == ["bias (1 non-finite value)"]
    assert verdict.why == ["non-finite weights or optimizer state: bias (1 non-finite value)", "a test"]
