"""GradGuardCallback under Hugging Face's Trainer: a tiny GPT-2 (``GPT2Config(n_layer=2, n_embd=64)``)
trained by ``transformers.Trainer`` on the CPU.

* the norms the guard reports equal torch's own, computed here from ``.grad`` (float64);
* a NaN gradient planted at one step is a real skip: the weights, AdamW's state (its ``step`` counts
  included) and the LR scheduler's state are bit-identical across that step; the event names the
  layer it began in; the run goes on, finite;
* the Trainer's ``max_grad_norm`` clipping first is warned about once, and measured after;
* ``gradguard report`` and the GradGuard tab's routes read the Trainer's TensorBoard directory;
* a persistent fault rolls back the model, the optimizer and the scheduler, and calls the user's hook;
* the guard's state rides in the Trainer's checkpoint and comes back on resume;
* 2 processes under ``torchrun`` (DDP, gloo), faults on one rank (a NaN gradient, a NaN loss whose
  gradients are finite): both skip, neither hangs;
* every option's bad value is a clear error; without transformers, a clear ImportError.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from lightning_gradguard import GradGuardWarning, NormClip, Rollback
from lightning_gradguard.integrations.transformers import GradGuardCallback
from lightning_gradguard.integrations.transformers import trainer as trainer_glue
from lightning_gradguard.integrations.transformers.reporting import forward_metrics
from tests.helpers import RENDEZVOUS_ERRORS, free_port

ROOT = Path(__file__).resolve().parents[2]
NAN_STEP = 3
ORIGIN = "transformer.h.1.mlp.c_proj"  # the planted NaN enters the gradient at h.1.mlp's output
VOCAB = 128


# ------------------------------------------------------------------------------ the model and the faults
def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def dataset(n: int = 32, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 16), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class PlantNaN(TrainerCallback):
    """A NaN gradient at h.1.mlp's output on the given steps (and rank): every layer up to that one gets a
    NaN gradient, ``transformer.h.1.mlp.c_proj`` first in the backward pass."""

    def __init__(self, steps: set[int], rank: int | None = None) -> None:
        self.steps, self.rank = steps, rank
        self.step = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        def hook(module: Any, inputs: Any, out: Tensor) -> None:
            mine = self.rank is None or int(os.environ.get("RANK", "0")) == self.rank
            if module.training and mine and self.step in self.steps:
                out.register_hook(lambda g: torch.full_like(g, math.nan))

        model.transformer.h[1].mlp.register_forward_hook(hook)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step


def _state(model: Any, optimizer: Any, scheduler: Any) -> tuple[Any, ...]:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())


def _same(a: Any, b: Any) -> bool:
    """Bit-identical nested structures of tensors and plain values."""
    if isinstance(a, Tensor):
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))  # a DTensor's shard (FSDP2)
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class StateAround(TrainerCallback):
    """The weights, the optimizer's state dict and the scheduler's, before (``on_step_begin``) and after
    (``on_step_end``) each step; ``unchanged(step)`` compares them bit for bit."""

    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)
        self.before: dict[int, tuple[Any, ...]] = {}
        self.after: dict[int, tuple[Any, ...]] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step in self.steps:
            self.before[state.global_step] = _state(kw["model"], kw["optimizer"], kw["lr_scheduler"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step - 1 in self.steps:
            self.after[state.global_step - 1] = _state(kw["model"], kw["optimizer"], kw["lr_scheduler"])

    def unchanged(self, step: int = NAN_STEP) -> dict[str, bool]:
        parts = ("weights", "optimizer", "scheduler")
        return {name: _same(a, b) for name, a, b in zip(parts, self.before[step], self.after[step], strict=True)}


class Reference(TrainerCallback):
    """torch's own norms of the gradients the guard is about to see (listed before it): per layer (the
    module owning each parameter) and total, in float64."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        squares: dict[str, Tensor] = {}
        for name, p in kw["model"].named_parameters():
            if p.grad is not None:
                layer = name.rsplit(".", 1)[0]
                zero = torch.zeros((), dtype=torch.float64)
                squares[layer] = squares.get(layer, zero) + p.grad.double().square().sum()
        norms = {f"gradguard/layer/{k}": float(v.sqrt()) for k, v in squares.items()}
        norms["gradguard/total_norm"] = float(sum(squares.values()).sqrt())  # type: ignore[union-attr]
        self.norms[state.global_step] = norms


class Seen(TrainerCallback):
    """What the guard reported at each step (listed after it)."""

    def __init__(self, guard: GradGuardCallback) -> None:
        self.guard = guard
        self.metrics: dict[int, dict[str, float]] = {}
        self.skipped: dict[int, bool] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        report = self.guard.last_report
        assert report is not None and report.step == state.global_step
        self.metrics[state.global_step] = dict(report.metrics)
        self.skipped[state.global_step] = report.skipped


def train(
    tmp_path: Path, guard: GradGuardCallback, *, steps: int = 8, before: tuple[TrainerCallback, ...] = (),
    after: tuple[TrainerCallback, ...] = (), data: int = 32, resume: str | None = None, **overrides: Any,
) -> Trainer:  # fmt: skip
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0, seed=0,
    )  # fmt: skip
    options.update(overrides)
    trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(**options), train_dataset=dataset(data),
                      callbacks=[*before, guard, *after])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


# ------------------------------------------------------------------------------ one guarded run, looked at closely
@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 steps, a NaN gradient at step 3, the guard clipping at 1.0, TensorBoard in a known directory."""
    root = tmp_path_factory.mktemp("hf")
    guard = GradGuardCallback(clip=NormClip(1.0))
    reference, around = Reference(), StateAround(NAN_STEP, NAN_STEP + 1)
    seen = Seen(guard)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TENSORBOARD_LOGGING_DIR", str(root / "tb" / "hf"))
        trainer = train(root, guard, before=(PlantNaN({NAN_STEP}), reference), after=(seen, around),
                        report_to=["tensorboard"])  # fmt: skip
    return {"root": root, "guard": guard, "trainer": trainer, "reference": reference, "around": around, "seen": seen}


def test_every_norm_is_torchs_own_and_the_cadence_is_the_trainers(nan_run: dict[str, Any]) -> None:
    reference, seen = nan_run["reference"].norms, nan_run["seen"].metrics
    assert sorted(seen) == list(range(8))  # logging_steps=1: every step is a logging step
    for step in range(8):
        if step == NAN_STEP:
            continue
        expected, got = reference[step], seen[step]
        layers = [k for k in expected if k.startswith("gradguard/layer/")]
        assert len(layers) == 15 and set(layers) == {k for k in got if k.startswith("gradguard/layer/")}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (step, key)
        clipped = min(expected["gradguard/total_norm"], 1.0)
        assert got["gradguard/total_norm_clipped"] == pytest.approx(clipped, rel=1e-5)
    assert math.isnan(seen[NAN_STEP]["gradguard/total_norm"])


def test_a_planted_nan_gradient_is_a_real_skip(nan_run: dict[str, Any]) -> None:
    guard, around, seen, trainer = nan_run["guard"], nan_run["around"], nan_run["seen"], nan_run["trainer"]
    assert [s for s, skipped in seen.skipped.items() if skipped] == [NAN_STEP]
    assert around.unchanged(NAN_STEP) == {"weights": True, "optimizer": True, "scheduler": True}
    # the next step is a healthy one: it changes all three (the comparison can fail)
    assert around.unchanged(NAN_STEP + 1) == {"weights": False, "optimizer": False, "scheduler": False}
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert (event.step, event.origin, event.action) == (NAN_STEP, ORIGIN, "skipped")
    assert event.layers[-1] == ORIGIN and "transformer.ln_f" not in event.layers
    # replayed on the step's micro-batch through the model: the planted hook fires again, in float32 too
    assert event.extra["replay"]["verdict"] == "data or numerics"
    # the run went on: 8 steps counted (the skipped one too), 7 updates and 7 scheduler steps made
    assert trainer.state.global_step == 8 and guard.skipped_steps == 1
    assert trainer.lr_scheduler.state_dict()["last_epoch"] == 7
    first = trainer.model.lm_head.weight
    assert int(trainer.optimizer.state[first]["step"]) == 7
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses[NAN_STEP + 1 :])
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_a_skip_on_a_step_that_does_not_log_holds_the_scheduler_too(tmp_path: Path) -> None:
    """The Trainer's default AdamW is fused, which the guard could skip on the device with no host read
    on a step that does not log: the scheduler's hold needs the decision on the host at every step."""
    guard, around = GradGuardCallback(log_every_n_steps=100), StateAround(2)
    trainer = train(tmp_path, guard, steps=4, before=(PlantNaN({2}),), after=(around,))
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert [(e.kind, e.step, e.action) for e in guard.events] == [("nonfinite", 2, "skipped")]
    assert around.unchanged(2) == {"weights": True, "optimizer": True, "scheduler": True}


def test_a_nan_loss_is_named_the_origin_from_the_models_own_loss(tmp_path: Path) -> None:
    """The Trainer hands callbacks no loss: the guard reads the one the model returns (a hook on the model)."""

    class NanLogits(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            def hook(module: Any, inputs: Any, out: Tensor) -> Tensor | None:
                return out * math.nan if module.training and state.global_step == 1 else None

            model.lm_head.register_forward_hook(hook)

    guard = GradGuardCallback(log_every_n_steps=100)
    train(tmp_path, guard, steps=3, before=(NanLogits(),))
    assert [(e.kind, e.step, e.origin, e.action) for e in guard.events] == [("nonfinite", 1, "loss", "skipped")]


def test_gradguard_report_and_the_tab_read_the_trainers_tensorboard_directory(
    nan_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.cli import main as report_main
    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    root, guard = nan_run["root"] / "tb", nan_run["guard"]
    assert report_main(["report", str(root / "hf"), "--json"]) == 1  # unhealthy: a non-finite step
    (cli,) = json.loads(capsys.readouterr().out)
    assert "1 non-finite step (1 skipped)" in cli["verdict"] and ORIGIN in cli["verdict"]

    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradguard": 0, "text": 0})
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(root))
    plugin = GradGuardPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(root)))
    ctx = context.RequestContext()
    assert plugin.is_active()
    layers = plugin.layers(ctx, "", "hf")
    assert layers["steps"] == list(range(8)) and layers["layers"][0] == "transformer.wte"
    assert layers["layers"][-1] == "transformer.ln_f" and layers["nonfinite_steps"] == [NAN_STEP]
    reference = nan_run["reference"].norms
    row = layers["log10"][layers["layers"].index(ORIGIN)]
    assert row[0] == pytest.approx(math.log10(reference[0][f"gradguard/layer/{ORIGIN}"]), rel=1e-6)
    events = plugin.events(ctx, "", "hf")
    assert [(e["kind"], e["step"], e["origin"]) for e in events] == [(e.kind, e.step, e.origin) for e in guard.events]
    assert plugin.report(ctx, "", "hf")["verdict"] == cli["verdict"]


def test_the_scalars_reach_the_trainers_other_reporters() -> None:
    class Reporter:
        def __init__(self) -> None:
            self.logged: list[dict[str, float]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float]) -> None:
            self.logged.append(logs)

    a, b = Reporter(), Reporter()
    forward_metrics([a, b], {"gradguard/total_norm": 2.0}, None, None, None)
    forward_metrics([a], {}, None, None, None)  # nothing new: nothing handed over
    assert a.logged == b.logged == [{"gradguard/total_norm": 2.0}] and a.logged[0] is not b.logged[0]


# ------------------------------------------------------------------------------ the Trainer clipping first
def test_the_trainer_clipping_first_is_warned_once_and_measured_after_it(tmp_path: Path) -> None:
    guard = GradGuardCallback(clip=NormClip(0.5))
    reference, seen = Reference(), Seen(guard)
    with pytest.warns(GradGuardWarning) as caught:
        options = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                       report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
        assert TrainingArguments(**options).max_grad_norm == 1.0  # the Trainer's default
        trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(**options), train_dataset=dataset(),
                          callbacks=[reference, guard, seen])  # fmt: skip
        trainer.train()
    mine = [str(w.message) for w in caught if issubclass(w.category, GradGuardWarning)]
    assert len(mine) == 1 and "max_grad_norm=1" in mine[0] and "clips a second time" in mine[0]
    for step in range(3):  # measured after the Trainer's clip: torch's norms of the clipped gradients
        assert reference.norms[step]["gradguard/total_norm"] <= 1.0 + 1e-6
        for key, value in reference.norms[step].items():
            assert seen.metrics[step][key] == pytest.approx(value, rel=1e-6), (step, key)


def test_without_a_clipper_the_warning_does_not_speak_of_clipping_twice(tmp_path: Path) -> None:
    with pytest.warns(GradGuardWarning, match="max_grad_norm=0.3") as caught:
        trainer_glue.check_trainer(TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.3), object(), None)
    assert "twice" not in str(caught[0].message) and "second time" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_glue.check_trainer(TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0), object(), None)


# ------------------------------------------------------------------------------ rollback, resume
def test_a_persistent_fault_rolls_back_model_optimizer_and_scheduler(tmp_path: Path) -> None:
    rolled: list[Any] = []
    guard = GradGuardCallback(rollback=Rollback(every=2, keep=2), max_consecutive_skips=2, on_rollback=rolled.append,
                              log_every_n_steps=100)  # fmt: skip
    around = StateAround(*range(12))
    train(tmp_path, guard, steps=12, before=(PlantNaN({5, 6}),), after=(around,))
    (event,) = [e for e in guard.events if e.kind == "rollback"]
    assert rolled == [event] and event.step == 6
    snap = event.extra["snapshot_step"]
    assert snap in (2, 4)
    # after the rolled-back step, the model, AdamW and the scheduler are as they were before the snapshot's step
    restored, kept = around.after[6], around.before[snap]
    assert [_same(a, b) for a, b in zip(restored, kept, strict=True)] == [True, True, True]
    assert guard.skipped_steps == 2 and all(bool(torch.isfinite(p).all()) for p in around.after[11][0].values())
    # the skip list names the batches whose updates are gone, by (epoch, batch index), beside the Trainer's output
    skips = json.loads((tmp_path / "out" / "gradguard_skips.json").read_text())["skips"]
    assert [(s["epoch"], s["batch_idx"]) for s in skips] == [(0, b) for b in range(snap, 7)]
    assert json.loads(json.dumps(guard.state(), sort_keys=True))  # the checkpoint's JSON holds it


def test_on_nonfinite_stop_stops_the_trainer_after_the_skipped_step(tmp_path: Path) -> None:
    guard, around = GradGuardCallback(on_nonfinite="stop", log_every_n_steps=100), StateAround(1)
    trainer = train(tmp_path, guard, steps=6, before=(PlantNaN({1}),), after=(around,))
    assert trainer.state.global_step == 2
    assert [(e.kind, e.action) for e in guard.events] == [("nonfinite", "stopped"), ("stopped", "stopped")]
    assert around.unchanged(1) == {"weights": True, "optimizer": True, "scheduler": True}


def test_the_guards_state_rides_in_the_checkpoint_and_comes_back(tmp_path: Path) -> None:
    first = GradGuardCallback(log_every_n_steps=100)
    train(tmp_path, first, steps=4, before=(PlantNaN({1}),), save_strategy="steps", save_steps=4)
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GradGuardCallback"]["attributes"]["_saved_guard_state"]["skipped_steps"] == 1
    resumed = GradGuardCallback(log_every_n_steps=100)
    train(tmp_path, resumed, steps=6, resume=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.skipped_steps == 1 and resumed.nonfinite_steps == 1 and resumed.steps == 6


def test_a_guard_the_trainer_recreated_from_a_checkpoint_is_refused(tmp_path: Path) -> None:
    train(tmp_path, GradGuardCallback(log_every_n_steps=100), steps=2, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        train(tmp_path, GradGuardCallback(clip=NormClip(1.0)), steps=3, resume=str(tmp_path / "out" / "checkpoint-2"),
              restore_callback_states_from_checkpoint=True)  # fmt: skip


# ------------------------------------------------------------------------------ distributed
def test_ddp_under_torchrun_a_fault_on_one_rank_is_skipped_by_both(tmp_path: Path) -> None:
    script = ROOT / "tests" / "hf_ddp_run.py"
    for attempt in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        if attempt == 0 and proc.returncode != 0 and any(e in proc.stderr for e in RENDEZVOUS_ERRORS):
            continue
        break
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"hf{r}.json").read_text()) for r in (0, 1)]
    unchanged = {"weights": True, "optimizer": True, "scheduler": True}
    for r in ranks:  # rank 1's NaN gradient (step 3) and its NaN loss with finite gradients (step 4)
        assert r["world"] == 2 and r["global_step"] == 6 and r["finite"]
        assert r["events"] == [["nonfinite", NAN_STEP, "skipped"], ["nonfinite", NAN_STEP + 1, "skipped"]]
        assert r["skipped"] == 2 and r["unchanged"] == [unchanged, unchanged]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # one decision: the replicas never diverge


def test_fp16_gradients_are_unscaled_once_before_the_guard_measures() -> None:
    """accelerate's GradScaler (fp16, on a GPU): the guard unscales, unless the Trainer's clipping already
    did; the scaler's own step then does not unscale again (here on a CPU GradScaler)."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    (scaler.scale(p.sum()) * 2.0).backward()  # gradients scaled by the loss scale: 16 each
    assert p.grad is not None and p.grad.tolist() == [16.0, 16.0, 16.0]
    trainer_glue.scaler_unscaled(scaler, optimizer)
    trainer_glue.scaler_unscaled(scaler, optimizer)  # already unscaled (as after the Trainer's clip): a no-op
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    scaler.step(optimizer)
    scaler.update()
    assert p.detach().tolist() == pytest.approx([0.8, 0.8, 0.8])


def test_deepspeed_is_refused_with_a_reason(tmp_path: Path) -> None:
    class Args:
        deepspeed = "ds_config.json"
        max_grad_norm = 0.0

    with pytest.raises(ValueError, match="does not support DeepSpeed.*partitions the gradients"):
        trainer_glue.check_trainer(Args(), object(), None)


class RecurrentLM(torch.nn.Module):
    """Any module the Trainer can train (it returns its loss): an LSTM over 12 timesteps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = torch.nn.LSTM(4, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.head(self.rnn(x)[0][:, -1]), labels)}


def test_per_timestep_tracking_follows_the_trainers_logging_steps(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(12, 4, generator=g), "labels": torch.randn(1, generator=g)} for _ in range(16)]
    guard = GradGuardCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             max_grad_norm=0.0)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=RecurrentLM(), args=args, train_dataset=data, callbacks=[guard]).train()
    assert guard.log_every_n_steps == 2 and guard.timestep_norms["rnn"].shape == (12,)
    assert [step for step, _ in guard.timestep_heat["rnn"]] == [1, 3]  # the logging steps, armed there only


def test_replay_is_off_under_data_parallelism_and_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    guard = GradGuardCallback(log_every_n_steps=100)
    train(tmp_path, guard, steps=1)
    assert guard.replay_off is None  # one process: replayed (test_a_planted_nan_gradient_is_a_real_skip)
    monkeypatch.setattr(trainer_glue, "world_size", lambda: 2)
    monkeypatch.setattr(trainer_glue, "reducer", lambda: None)
    monkeypatch.setattr(trainer_glue, "gatherer", lambda: None)
    guard = GradGuardCallback(log_every_n_steps=100)
    train(tmp_path, guard, steps=1)
    assert guard.replay_off is not None and "data parallelism" in guard.replay_off


# ------------------------------------------------------------------------------ the options and the import
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clip": 1.0}, TypeError, "Expected `clip` to be a Clipper"),
        ({"log_every_n_steps": 0}, ValueError, "Expected `log_every_n_steps` to be an int >= 1"),
        ({"max_dumps": 0}, ValueError, "`max_dumps`"),
        ({"log_histograms": "yes"}, TypeError, "Expected `log_histograms` to be a bool"),
        ({"images": 1}, TypeError, "Expected `images` to be a bool"),
        ({"images_in_background": None}, TypeError, "Expected `images_in_background` to be a bool"),
        ({"sharded": True}, TypeError, "sets `sharded` itself"),
        ({"model": None}, TypeError, "sets `model` itself"),
        ({"components": 3}, TypeError, "Expected `components` to be a list"),
        ({"on_nonfinite": "ignore"}, ValueError, "Expected `on_nonfinite` to be one of"),
        ({"vanish_treshold": 1e-6}, TypeError, "unexpected keyword argument 'vanish_treshold'"),
    ],
)
def test_every_bad_option_is_a_clear_error(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GradGuardCallback(**kwargs)


def test_the_callback_takes_the_core_options_and_adds_the_adapters() -> None:
    import inspect

    from lightning_gradguard import GradGuard

    mine = inspect.signature(GradGuardCallback).parameters
    lightning = inspect.signature(GradGuard).parameters
    assert [(p.name, p.default) for p in mine.values()] == [(p.name, p.default) for p in lightning.values()]
    guard = GradGuardCallback(vanish_threshold=1e-6, spike_zscore=None, max_events=7)
    assert (guard.vanish_threshold, guard.spike_zscore, guard.max_events) == (1e-6, None, 7)
    assert guard.core is guard and json.dumps(guard.state(), sort_keys=True)


# As if transformers and accelerate were not installed: not importable, and no distribution metadata (which
# torchmetrics, under Lightning, reads to decide whether to import transformers).
_BLOCK = """
import importlib.metadata as md, sys
for name in ("transformers", "accelerate"):
    sys.modules[name] = None
_version, _distribution = md.version, md.distribution
def _hidden(real):
    def look(name):
        if name.lower() in ("transformers", "accelerate"):
            raise md.PackageNotFoundError(name)
        return real(name)
    return look
md.version, md.distribution = _hidden(_version), _hidden(_distribution)
"""


def test_without_transformers_the_core_and_lightning_load_and_the_callback_names_the_extra() -> None:
    code = _BLOCK + """
import lightning_gradguard
from lightning_gradguard import GradGuard, GuardCore
GuardCore(); GradGuard()
try:
    from lightning_gradguard.integrations.transformers import GradGuardCallback
except ImportError as exc:
    print("IMPORT-ERROR:", exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout and "pip install 'lightning-gradguard[transformers]'" in out.stdout
