"""Both Lightning namespaces, LightningCLI, Fabric and plain loops, loggers and torch.compile."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gradguard import GradGuard, GradGuardWarning, GuardCore, NormClip, ZClip
from tests.helpers import FaultNet, MemoryLogger, trainer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

L = pytest.importorskip("lightning.pytorch")


class UnifiedNet(L.LightningModule):  # type: ignore[misc,name-defined]
    """FaultNet's model, written against ``lightning.pytorch``."""

    def __init__(self, faults: dict[int, tuple[Any, ...]] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = FaultNet(faults)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.inner(x), y)
        if self.trainer.global_step in (self.inner.faults or {}):
            loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> Any:
        return self.inner.train_dataloader()


def unified_trainer(callbacks: Any, steps: int, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "bare"])
def test_lightning_namespace_trainer(as_list: bool) -> None:
    guard = GradGuard(clip=NormClip(0.5))
    assert isinstance(guard, L.Callback)
    with pytest.warns(GradGuardWarning, match="origin 'loss'"):
        unified_trainer([guard] if as_list else guard, steps=5).fit(UnifiedNet({2: ("loss",)}))
    assert guard.skipped_steps == 1 and guard.core.steps == 5
    assert guard.last_report is not None and guard.last_report.metrics["gradguard/total_norm_clipped"] <= 0.5 + 1e-6


def test_lightning_namespace_checkpoint_and_resume(tmp_path: Path) -> None:
    from lightning_gradguard.lightning import GradGuard as UnifiedGuard

    guard = UnifiedGuard(clip=ZClip(warmup_steps=2))
    with pytest.warns(GradGuardWarning):
        t = unified_trainer([guard], steps=4)
        t.fit(UnifiedNet({1: ("loss",)}))
    t.save_checkpoint(tmp_path / "u.ckpt")
    resumed = UnifiedGuard(clip=ZClip(warmup_steps=2))
    unified_trainer([resumed], steps=6).fit(UnifiedNet(), ckpt_path=tmp_path / "u.ckpt")
    assert resumed.skipped_steps == 1 and resumed.core.steps == 6
    assert resumed.core.clip is not None and resumed.core.clip.state_dict()["mean"] is not None


def test_lightning_cli_with_the_shipped_yaml(tmp_path: Path) -> None:
    from cli_model import main as cli_main

    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "cli_config.yaml"),
            "--trainer.max_steps=12",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ]
    )
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert isinstance(guard.core.clip, ZClip) and guard.core.clip.z_threshold == 2.5
    assert guard.log_every_n_steps == 10 and guard.core.steps == 12


def test_lightning_cli_with_empty_init_args(tmp_path: Path) -> None:
    from cli_model import main as cli_main

    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n  max_steps: 3\n  accelerator: cpu\n  logger: false\n  enable_progress_bar: false\n"
        "  callbacks:\n    - class_path: lightning_gradguard.GradGuard\n      init_args:\n"
        "        clip:\n          class_path: lightning_gradguard.ZClip\n"
    )
    cli = cli_main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert isinstance(guard.core.clip, ZClip) and guard.core.steps == 3


def test_plain_pytorch_example() -> None:
    from plain_pytorch import main as plain_main

    with pytest.warns(GradGuardWarning, match="origin 'loss'"):
        guard = plain_main(steps=60, nan_at=20)
    assert guard.steps == 60 and guard.skipped_steps == 1 and guard.origins == {"loss": 1}


def test_fabric_example() -> None:
    from fabric_loop import main as fabric_main

    with pytest.warns(GradGuardWarning, match="origin 'loss'"):
        guard = fabric_main(steps=40, nan_at=10)
    assert guard.skipped_steps == 1
    assert sorted(guard.layers.forward_names(next(iter(guard.layers._layouts.values())))) == ["0", "2"]


def test_fabric_fp16_scaled_gradients_are_measured_unscaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fabric unscales inside ``optimizer.step()``, so the guard sees gradients still multiplied by the
    loss scale (2**16): every norm it reports must equal the reference computed from ``.grad`` at the
    same moment, divided by the scale; the NaN loss at step 10 is one ``nonfinite`` event, origin loss,
    which the GradScaler skips."""
    from fabric_loop import main as fabric_main

    reported: list[float] = []
    reference: list[float] = []
    step = GuardCore.step

    def recording(self: GuardCore, optimizer: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        scale = float(kwargs["scaler"].get_scale())  # 2**16 at first
        reference.append(float(torch.nn.utils.get_total_norm(grads)) / scale)  # before the guard touches them
        report = step(self, optimizer, **kwargs)
        reported.append(float(report.total_norm))
        return report

    monkeypatch.setattr(GuardCore, "step", recording)
    from lightning_fabric.plugins.precision import MixedPrecision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fp16 on CPU: Fabric(precision="16-mixed") silently becomes bf16 there, with no scaler
        guard = fabric_main(steps=30, nan_at=10, plugins=[MixedPrecision("16-mixed", "cpu")])
    events = [(e.kind, e.step, e.origin, e.action) for e in guard.events]
    assert events == [("nonfinite", 10, "loss", "skipped by the GradScaler")]
    assert (guard.nonfinite_steps, guard.amp_overflow_steps, guard.skipped_steps) == (1, 0, 0)
    finite = [(r, ref) for r, ref in zip(reported, reference, strict=True) if math.isfinite(ref)]
    assert len(finite) == 29
    assert [r for r, _ in finite] == pytest.approx([ref for _, ref in finite], rel=1e-5)
    assert guard.max_total_norm == pytest.approx(max(ref for _, ref in finite), rel=1e-5)


def test_loggers_csv_several_and_none(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    csv, memory = CSVLogger(tmp_path, name="csv", version=0), MemoryLogger()
    guard = GradGuard(log_every_n_steps=2)
    trainer([guard], steps=4, logger=[csv, memory]).fit(FaultNet())
    text = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "gradguard/total_norm" in text and "gradguard/layer/l1" in text
    assert len(memory.series("gradguard/total_norm")) == 2
    trainer([GradGuard(log_every_n_steps=1)], steps=2, logger=False).fit(FaultNet())  # no logger: no error


def test_tensorboard_extras_are_skipped_for_writers_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's real TensorBoardLogger over a writer that lacks images, text and custom scalars (a
    minimal tensorboardX-like writer): the scalars still go out, the extras are skipped without error."""
    from pytorch_lightning.loggers import TensorBoardLogger

    class ScalarsOnly:
        def __init__(self) -> None:
            self.scalars: list[str] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append(tag)

        def flush(self) -> None:
            pass

    writer = ScalarsOnly()
    monkeypatch.setattr(TensorBoardLogger, "experiment", property(lambda self: writer))
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    with pytest.warns(GradGuardWarning):
        trainer([GradGuard(log_every_n_steps=1, explode_threshold=1e-9)], steps=3, logger=logger).fit(FaultNet())
    assert "gradguard/total_norm" in writer.scalars and "gradguard/layer/l1" in writer.scalars


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_model_keeps_names_and_is_guarded(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    guard = GuardCore(compiled, log_every_n_steps=1, track_timesteps=False)
    x = torch.randn(16, 4)
    compiled(x).pow(2).mean().backward()
    report = guard.step(opt)
    ref = {n: torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()])).item()
           for n, m in (("0", model[0]), ("2", model[2]))}
    assert report.layer_norms == pytest.approx(ref, rel=1e-6)
    opt.zero_grad()
    (compiled(x) * math.nan).sum().backward()
    with pytest.warns(GradGuardWarning, match="origin '2'"):
        bad = guard.step(opt)
    assert bad.skipped and all(p.grad is None for p in compiled.parameters())


def test_compiled_lightning_module() -> None:
    model = FaultNet({2: ("grad", 1, math.nan)})
    compiled = torch.compile(model, backend="eager")
    guard = GradGuard()
    with pytest.warns(GradGuardWarning, match="origin 'l1'"):
        trainer([guard], steps=4).fit(compiled)
    assert guard.skipped_steps == 1
