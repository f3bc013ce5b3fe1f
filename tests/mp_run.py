"""Run by tests/integrations/test_model_parallel.py: Lightning's ModelParallelStrategy on 2 CPU processes (gloo).

Usage: python tests/mp_run.py OUTDIR MODE [CKPT]
MODE: ``fsdp2`` (fully_shard), ``tp`` (a tensor-parallel plan), ``nan`` (FSDP2, a NaN gradient on
rank 1 only at step 3), ``save`` / ``resume`` (FSDP2 with ZClip: a distributed checkpoint after step
6, then a run resumed from it), ``plain`` (the same model, one process: the names a user expects),
``agc`` (FSDP2 with AGC, biases excluded), ``agc_refused`` (FSDP2 with AGC on everything: refused),
``nan_raise`` / ``nan_stop`` (as ``nan`` under those policies), ``2d`` (4 processes: FSDP2 over 2
data-parallel ranks x tensor parallel over 2), ``fsdp1`` /
``fsdp1_flat`` (Lightning's FSDPStrategy on every GPU, ``use_orig_params`` True / False: CUDA only).
Each rank writes OUTDIR/<mode><r>.json: the guard's reports next to references computed here from
the full (unsharded) gradients with ``DTensor.full_tensor()``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AGC, GradGuard, GradGuardWarning, NonFiniteGradientError, NormClip, ZClip
from tests.helpers import leave_when_written, parallelize, poison

MAX_NORM = 0.05
NAN_STEP = 3


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class SeqModel(pl.LightningModule):
    """embed -> LSTM -> head (FSDP2), or an MLP l0 -> l1 -> l2 (tensor parallel)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        if mode in ("tp", "2d"):
            self.l0 = nn.Linear(6, 16)
            self.l1 = nn.Linear(16, 8)
            self.l2 = nn.Linear(8, 1)
        else:
            self.embed = nn.Linear(3, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode in ("tp", "2d"):
            return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))
        h = self.embed(x)
        if h.requires_grad:  # the reference for the per-timestep norms: this rank's ∂L/∂h
            h.register_hook(lambda g: setattr(self, "captured", g.detach().clone()))
        out = self.head(self.rnn(h)[0][:, -1])
        if self.mode.startswith("nan") and self.global_rank == 1 and self.trainer.global_step == NAN_STEP:
            out = poison(out, math.nan)
        return out  # type: ignore[no-any-return]

    def configure_model(self) -> None:
        if self.mode in ("plain", "fsdp1", "fsdp1_flat"):  # FSDP1 wraps the model itself
            return
        tp = self.mode in ("tp", "2d")
        units = [self.l0, self.l1, self.l2] if tp else [self.embed, self.rnn, self.head]
        parallelize(self, self.device_mesh, tensor_parallel=tp, fsdp=self.mode != "tp", units=units)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        shape = (16, 6) if self.mode in ("tp", "2d") else (16, 5, 3)
        return DataLoader(TensorDataset(torch.randn(*shape, generator=g), torch.randn(16, 1, generator=g)), 8)


def layer_of(name: str) -> str:
    name = ".".join(part for part in name.split(".") if part != "_fsdp_wrapped_module")
    module, _, param = name.rpartition(".")
    if module == "rnn":
        return f"rnn.{param.rsplit('_', 1)[1]}"
    return module


class Reference(pl.Callback):
    """Listed before the guard: the full per-layer and total norms, before clipping (and, for AGC, the
    full weights and gradients)."""

    def __init__(self, keep: bool = False) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.keep = keep
        self.full: dict[int, dict[str, Any]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.keep:
            self.full[trainer.global_step] = {
                n: (full(p.detach()).tolist(), full(p.grad).tolist()) for n, p in pl_module.named_parameters()
            }
        grads: dict[str, list[Tensor]] = {}
        if type(trainer.strategy).__name__ == "FSDPStrategy":  # FSDP1: flat views of this rank's shard
            grads = self._fsdp1_grads(trainer)
        for name, p in pl_module.named_parameters():
            if p.grad is not None and type(trainer.strategy).__name__ != "FSDPStrategy":
                grads.setdefault(layer_of(name), []).append(full(p.grad))
        row = {f"gradguard/layer/{k}": torch.linalg.vector_norm(torch.cat([g.flatten() for g in v])).item()
               for k, v in grads.items()}
        row["gradguard/total_norm"] = torch.linalg.vector_norm(
            torch.cat([g.flatten() for v in grads.values() for g in v])
        ).item()
        captured = getattr(pl_module, "captured", None)
        if captured is not None and trainer.world_size > 1:
            import torch.distributed as dist

            # the whole batch's ∂L/∂h: DP averages the ranks' gradients, so each rank's part is 1/R
            parts = [torch.empty_like(captured) for _ in range(trainer.world_size)]
            dist.all_gather(parts, captured)
            whole = torch.cat(parts) / trainer.world_size
            row["timestep/rnn"] = torch.linalg.vector_norm(whole, dim=(0, 2)).tolist()  # type: ignore[assignment]
        self.rows[trainer.global_step] = row


    @staticmethod
    def _fsdp1_grads(trainer: pl.Trainer) -> dict[str, list[Tensor]]:
        """FSDP1's whole gradients: summoned with the full parameters (use_orig_params=True), or
        each flat shard's squared sum all-reduced (use_orig_params=False: one unit, 'flat')."""
        import torch.distributed as dist
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = trainer.strategy.model
        if getattr(trainer.strategy, "kwargs", {}).get("use_orig_params", True):
            out: dict[str, list[Tensor]] = {}
            with FSDP.summon_full_params(model, with_grads=True):
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        out.setdefault(layer_of(name.removeprefix("_forward_module.")), []).append(p.grad.clone())
            return out
        squares = sum((p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None),
                      torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device))
        dist.all_reduce(squares)
        return {"flat": [squares.sqrt().float().reshape(1)]}


class After(pl.Callback):
    """Listed after the guard: the guard's report, and the full total norm the optimizer will get."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.rows: dict[int, dict[str, Any]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if type(trainer.strategy).__name__ == "FSDPStrategy":  # the whole clipped gradient, as the reference
            grads = [g for v in Reference._fsdp1_grads(trainer).values() for g in v]
        else:
            grads = [full(p.grad) for p in pl_module.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item() if grads else None
        report = self.guard.last_report
        assert report is not None
        self.rows[trainer.global_step] = {
            "metrics": report.metrics,
            "timesteps": {k: v.tolist() for k, v in report.timesteps.items()},
            "skipped": report.skipped,
            "clipped_total": total,
            "weights": {n: full(p.detach()).tolist() for n, p in pl_module.named_parameters()},
            "opt_steps": [full(s["step"]).item() for s in optimizer.state.values() if "step" in s],
            "grads": {n: full(p.grad).tolist() for n, p in pl_module.named_parameters() if p.grad is not None},
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.rows[trainer.global_step - 1]["weights_after"] = {
            n: full(p.detach()).tolist() for n, p in pl_module.named_parameters()
        }


COLLECTIVES: list[str] = []


def count_guard_collectives() -> None:
    """Count all_reduce calls made on behalf of the guard (a lightning_gradguard frame on the stack)."""
    import torch.distributed as dist

    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)
        for _ in range(8):
            if frame is None:
                break
            if "lightning_gradguard" in frame.f_code.co_filename:
                COLLECTIVES.append(frame.f_code.co_name)
                break
            frame = frame.f_back
        return original(*args, **kwargs)

    dist.all_reduce = counted


def main() -> None:
    count_guard_collectives()
    out, mode = Path(sys.argv[1]), sys.argv[2]
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    warnings.simplefilter("ignore")
    handler_log = out / f"handler-{mode}.txt"

    def handler(event: Any) -> None:
        with handler_log.open("a") as fh:
            fh.write(f"{event.kind} {event.step}\n")

    clip: Any = ZClip(warmup_steps=3, z_threshold=1.0) if mode in ("save", "resume") else NormClip(MAX_NORM)
    if mode.startswith("agc"):
        clip = AGC(0.01, exclude=["*bias*"] if mode == "agc" else [])
    policy: Any = {"nan_raise": "raise", "nan_stop": "stop"}.get(mode, "skip")
    guard = GradGuard(clip=clip, log_every_n_steps=1, alert_handlers=[handler], spike_warmup=2, on_nonfinite=policy)
    ref, after = Reference(keep=mode == "agc"), After(guard)
    callbacks: list[pl.Callback] = [ref, guard, after]
    steps = 10 if mode in ("save", "resume") else 6
    if mode == "save":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=6, save_top_k=-1))
    accelerator = "cpu"
    if mode == "plain":
        strategy: Any = "auto"
        devices = 1
    elif mode.startswith("fsdp1"):  # Lightning's FSDPStrategy: CUDA only (every GPU of the machine)
        from pytorch_lightning.strategies import FSDPStrategy

        accelerator, devices = "cuda", torch.cuda.device_count()
        strategy = FSDPStrategy(use_orig_params=mode == "fsdp1", auto_wrap_policy={nn.Linear, nn.LSTM})
    else:
        devices = 4 if mode == "2d" else 2
        tp = 2 if mode in ("tp", "2d") else 1
        strategy = ModelParallelStrategy(data_parallel_size=devices // tp, tensor_parallel_size=tp)
    t = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=mode == "save", enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, log_every_n_steps=1, num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        try:
            t.fit(SeqModel(mode), ckpt_path=ckpt)
        except (MisconfigurationException, NonFiniteGradientError) as exc:  # agc_refused, nan_raise
            # every rank gets here (a rank that did not would hang the others in the next collective)
            record = {"error": str(exc), "step": t.global_step}
            (out / f"{mode}{t.global_rank}.json").write_text(json.dumps(record))
            leave_when_written(t.global_rank, [out / f"{mode}{r}.json" for r in range(1, t.world_size)])
    rank = t.global_rank
    layout = guard.core.layers.layout(t.optimizers[0])
    clip_state = guard.core.clip.state_dict() if guard.core.clip is not None else {}
    result = {
        "rank": rank,
        "reference": {str(k): v for k, v in ref.rows.items()},
        "after": {str(k): v for k, v in after.rows.items()},
        "layers": guard.core.layers.forward_names(layout),
        "timesteps": sorted(guard.timestep_norms),
        "events": [(e.kind, e.step, e.origin, list(e.layers), e.action) for e in guard.events],
        "state": {k: v for k, v in guard.core.state_dict().items() if k not in ("clip", "alerts")},
        "clip_state": {k: v.tolist() if isinstance(v, Tensor) else v for k, v in clip_state.items()},
        "full_before": {str(k): v for k, v in ref.full.items()},
        "collectives": len(COLLECTIVES),
        "global_step": t.global_step,
    }
    (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    leave_when_written(rank, [out / f"{mode}{r}.json" for r in range(1, devices)])


if __name__ == "__main__":
    main()
