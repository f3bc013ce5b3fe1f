"""Run by tests/integrations/test_transformers.py under ``torchrun --nproc_per_node 2``: Hugging Face's
Trainer with GradGuardCallback on 2 CPU processes (DDP, gloo), two faults on rank 1 only: a NaN
gradient at step 3 (DDP's all-reduce copies it to every rank), and at step 4 a NaN loss whose
gradients are finite (the averaged gradients are healthy on both ranks: only the guard's sum of its
flags across ranks makes rank 0 skip too).

Usage: torchrun --nproc_per_node 2 tests/hf_ddp_run.py OUTDIR [MODE]
MODE: ``ddp`` (default: CPU, gloo) or ``fsdp2`` (accelerate's FSDP2 on every GPU, which the Trainer
applies only on an accelerator: run by benchmarks/hf_bench.py --gpu-checks).
Each rank writes OUTDIR/hf<r>.json: its guard's events and counters, the Trainer's steps, whether its
weights, optimizer state and LR scheduler state were unchanged across the faulty step, and the type
of its parameters (``DTensor`` under FSDP2).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lightning_gradguard import NormClip
from lightning_gradguard.integrations.transformers import GradGuardCallback
from tests.helpers import leave_when_written
from tests.integrations.test_transformers import NAN_STEP, PlantNaN, StateAround, dataset, tiny_gpt2

STEPS = 6
LOSS_STEP = NAN_STEP + 1


class NanLoss(TrainerCallback):
    """On rank 1 at ``LOSS_STEP``: the model's loss plus a NaN constant (its gradients unchanged, finite)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        def hook(module: Any, inputs: Any, out: Any) -> Any:
            if module.training and int(os.environ["RANK"]) == 1 and state.global_step == LOSS_STEP:
                out["loss"] = out["loss"] + torch.tensor(math.nan)
            return out

        model.register_forward_hook(hook)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard (FSDP2)


def main(out: Path, mode: str) -> None:
    rank = int(os.environ["RANK"])
    model = tiny_gpt2()
    guard = GradGuardCallback(clip=NormClip(1.0), log_every_n_steps=1)
    placement: dict[str, Any] = (
        {"use_cpu": True, "ddp_backend": "gloo"}
        if mode == "ddp"
        else {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}
    )
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], save_strategy="no", disable_tqdm=True, max_grad_norm=0.0, seed=0, **placement,
    )  # fmt: skip
    around = StateAround(NAN_STEP, LOSS_STEP)
    callbacks: list[TrainerCallback] = [PlantNaN({NAN_STEP}, rank=1), NanLoss(), guard, around]
    trainer = Trainer(model=model, args=args, train_dataset=dataset(64), callbacks=callbacks)
    trainer.train()
    result: dict[str, Any] = {
        "rank": rank,
        "world": torch.distributed.get_world_size(),
        "events": [(e.kind, e.step, e.action) for e in guard.events],
        "skipped": guard.skipped_steps,
        "global_step": trainer.state.global_step,
        "unchanged": [around.unchanged(NAN_STEP), around.unchanged(LOSS_STEP)],
        "weights": [float(_local(p).detach().double().sum()) for p in model.parameters()],
        "finite": all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()),
        "parameters": type(next(trainer.model.parameters())).__name__,
    }
    path = out / f"hf{rank}.json"
    path.write_text(json.dumps(result))
    others = [out / f"hf{r}.json" for r in range(1, int(result["world"]))]
    leave_when_written(rank, others)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
