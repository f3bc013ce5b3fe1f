"""Replaying a step under the Trainer: what the guard's ``replay`` component needs from Lightning.

* :func:`replay_closure`: ``training_step`` again on the step's (last) batch, with ``self.log`` and
  ``self.log_dict`` silenced (a replay's values must not reach the run's metrics: measured, an
  ``on_epoch=True`` metric otherwise reports the replay's value). The core runs it with the module's
  attributes as they were at ``on_train_batch_start`` and puts them back afterwards. It is a
  :class:`~lightning_gradguard.core.cross_replay.ReplayClosure`: under DDP the core can run it on
  another rank's batch too (a cross-rank replay: which device?).
* :func:`replay_precision`: the run's autocast (the precision plugin's forward context).
* :func:`why_no_replay`: where a replay cannot work, said once at ``on_fit_start``.
* :func:`keep_local_faults`: under DDP, a communication hook (the default all-reduce plus one
  device-side ``isfinite`` per bucket, no sync) that keeps whether this rank's own gradients were
  finite, so that a replay can name the faulty rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_gradguard.core.cross_replay import ReplayClosure

__all__ = ["keep_local_faults", "replay_closure", "replay_precision", "why_no_replay"]


def _silent(*args: Any, **kwargs: Any) -> None:
    """``self.log`` during a replay: the replay's values must not reach the run's metrics."""


def replay_closure(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> ReplayClosure:
    """``training_step(batch, batch_idx)`` of ``pl_module`` with ``self.log`` and ``self.log_dict``
    silenced for its duration (a module's own ``log`` attribute, if it set one, is put back); its
    ``.on(other)`` runs ``training_step(other, batch_idx)`` (another rank's batch, already on this
    rank's device)."""

    def step(batch: Any) -> Any:
        state = vars(pl_module)
        own = {name: state[name] for name in ("log", "log_dict") if name in state}
        for name in ("log", "log_dict"):
            state[name] = _silent
        try:
            return pl_module.training_step(batch, batch_idx)
        finally:
            for name in ("log", "log_dict"):
                if name in own:
                    state[name] = own[name]
                else:
                    del state[name]

    return ReplayClosure(step, batch)


def replay_precision(trainer: pl.Trainer) -> Callable[[], Any] | None:
    """The run's autocast (its precision plugin's forward context), or None for a float32 run."""
    if str(trainer.precision) in ("32-true", "32", "64-true", "64"):
        return None
    return trainer.precision_plugin.forward_context  # type: ignore[no-any-return]


def why_no_replay(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Where a replay cannot work (sharded strategies and manual optimization), or None."""
    strategy = type(trainer.strategy).__name__
    if strategy in ("FSDPStrategy", "ModelParallelStrategy"):
        return (
            f"under {strategy} the forward pass gathers the shards with collectives, which a replay on one "
            "step's batch would have to repeat on every rank in lockstep; the fault's layers and origin are "
            "still reported"
        )
    if not pl_module.automatic_optimization:
        return (
            "under manual optimization training_step steps the optimizers itself, so running it again on one "
            "step's batch would train; the fault's layers and backward origin are still reported"
        )
    return None


def keep_local_faults(trainer: pl.Trainer, replay: Any) -> None:
    """Under DDP the gradients the guard sees are averaged over the ranks, so a NaN from one rank is
    on every rank: a communication hook sets ``replay.local_grad_fault`` to whether this rank's own
    gradients were non-finite. Not when the strategy already has a hook of the user's."""
    strategy = trainer.strategy
    model = getattr(strategy, "model", None)
    if type(strategy).__name__ != "DDPStrategy" or getattr(strategy, "_ddp_comm_hook", None) is not None:
        return
    if not callable(getattr(model, "register_comm_hook", None)):
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state: Any, bucket: Any) -> Any:
        bad = (~torch.isfinite(bucket.buffer())).any()
        seen = replay.local_grad_fault
        replay.local_grad_fault = bad if seen is None else seen | bad
        return default_hooks.allreduce_hook(state, bucket)

    hook.__annotations__ = {}  # DDP checks the annotations, which postponed evaluation turns into strings
    model.register_comm_hook(None, hook)  # type: ignore[union-attr]
