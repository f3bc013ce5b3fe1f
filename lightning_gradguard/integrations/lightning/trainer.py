"""What the guard needs to know of the Trainer, read once: the strategy, the logging cadence, the run's
name, how a host object is gathered from every data-parallel rank, the module's rollback hook, and
where alarms go besides the guard's own router (a ``WandbLogger``'s ``wandb.alert``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities import rank_zero_warn

from lightning_gradguard.core.alerts import AlertRouter
from lightning_gradguard.notify.wandb import WandbAlert

__all__ = [
    "cadence", "check_trainer", "connect_wandb", "profile_gatherer", "run_name",
    "warn_without_optimizer",
]  # fmt: skip

# Strategies whose engine owns the gradients: no callback can see them.
_ENGINE_OWNED = ("DeepSpeedStrategy",)


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, clip: Any) -> bool:
    """Refuse what cannot work, warn about what is likely a mistake; whether the gradients are
    sharded flat views (FSDP1).

    Raises:
        MisconfigurationException: DeepSpeed, which owns and partitions the gradients.
    """
    strategy = type(trainer.strategy).__name__
    if strategy in _ENGINE_OWNED:
        raise MisconfigurationException(
            f"GradGuard does not support `{strategy}`: DeepSpeed owns and partitions the gradients (under "
            "ZeRO-2/3 `p.grad` is None) and clips and skips steps inside its engine (its `gradient_clipping` "
            "config), where no callback can see them. Use strategy='fsdp' or ModelParallelStrategy (FSDP2, "
            "tensor parallel), which GradGuard supports with global norms, clipping and skips, or strategy='ddp'."
        )
    if trainer.gradient_clip_val and clip is not None:
        rank_zero_warn(
            f"GradGuard clips with {clip!r} and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
            "is also set: gradients would be clipped twice (GradGuard first, then Lightning). Remove one of them."
        )
    if not any(p.requires_grad for p in pl_module.parameters()):
        rank_zero_warn(
            "GradGuard: the model has no trainable parameters (none, or all frozen): there is nothing to "
            "measure, clip or guard."
        )
    return strategy == "FSDPStrategy"  # FSDP1's gradients are flat-view shards


def warn_without_optimizer(trainer: pl.Trainer) -> None:
    """``configure_optimizers`` returned None: Lightning steps a mock optimizer, which holds nothing."""
    if all(type(opt).__name__ == "_MockOptimizer" for opt in trainer.optimizers):
        rank_zero_warn(
            "GradGuard: the LightningModule configures no optimizer (`configure_optimizers` returned None): "
            "there is no optimizer step to guard, measure or clip."
        )


def cadence(own: int | None, trainer: pl.Trainer) -> int | None:
    """The logging cadence, decided once: the guard's own, else the Trainer's (0 there: Lightning never
    logs, None here)."""
    n = own or int(getattr(trainer, "log_every_n_steps", 50))
    return n if n > 0 else None


def run_name(trainer: pl.Trainer) -> str:
    """The run's name in alerts: the first logger's name and version, else the root directory's name."""
    for logger in trainer.loggers:
        name, version = getattr(logger, "name", None), getattr(logger, "version", None)
        if name:
            return f"{name}/{version}" if version not in (None, "") else str(name)
    return os.path.basename(os.path.abspath(trainer.default_root_dir))


def profile_gatherer(trainer: pl.Trainer) -> Callable[[Any], list[Any]] | None:
    """Gathers a host object from every data-parallel rank (tensor-parallel ranks share their inputs,
    so only the data-parallel ones), or None on one process."""
    if trainer.world_size <= 1:
        return None
    import torch.distributed as dist

    mesh: Any = getattr(trainer.strategy, "device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    group = mesh["data_parallel"].get_group() if "data_parallel" in names else None

    def gather(local: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, local, group=group)
        return out

    return gather


def connect_wandb(trainer: pl.Trainer, alerts: AlertRouter, previous: WandbAlert | None) -> WandbAlert | None:
    """With a ``WandbLogger``, alarms also go to ``wandb.alert`` (rate-limited like the others), on rank
    zero; the notifier of an earlier fit is replaced. Returns the one connected, or None."""
    if previous in alerts.notifiers:
        alerts.notifiers.remove(previous)
    found = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    if not found or not trainer.is_global_zero:
        return None
    connected = WandbAlert(getattr(found[0], "experiment", None))
    alerts.notifiers.append(connected)
    return connected
