"""What the guard needs to know of Hugging Face's Trainer, read once at ``on_train_begin``: the callback
handler (the Trainer hands a callback none of its neighbours), what is refused and what is likely a
mistake (DeepSpeed; ``max_grad_norm``), the logging cadence, the batch positions of a step (the skip
list), how a flag is summed across ranks, the model's rollback hook, and the resumed guard state."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.alerts import is_rank_zero
from lightning_gradguard.errors import warn

__all__ = [
    "STATE_NAME", "DataLayout", "cadence", "check_trainer", "find_handler", "gatherer", "rank",
    "reducer", "resumed_state", "scaler_unscaled", "sharded", "why_no_replay", "world_size",
]  # fmt: skip

STATE_NAME = "GradGuardCallback"  # the guard's entry in the checkpoint's trainer_state.json


def find_handler(depth: int = 8) -> Any | None:
    """The Trainer's ``CallbackHandler`` that is calling the current hook, or None.

    A ``TrainerCallback`` is given the model, the optimizer, the scheduler and the data loaders, but
    neither the Trainer nor the other callbacks: the TensorBoard callback's directory and the W&B run
    are only reachable through the handler, which is the caller of every hook
    (``CallbackHandler.call_event``). It is found on the calling frames, by its type.
    """
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_trainer(args: Any, optimizer: Any, clip: Any) -> None:
    """Refuse what cannot work; warn once about what is likely a mistake (the Trainer clipping first).

    Raises:
        ValueError: DeepSpeed, which owns and partitions the gradients.
    """
    ds = getattr(args, "deepspeed", None) or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper"
    if ds:
        raise ValueError(
            "GradGuardCallback does not support DeepSpeed (`TrainingArguments(deepspeed=...)`): DeepSpeed owns and "
            "partitions the gradients (under ZeRO-2/3 `p.grad` is None) and clips and skips steps inside its engine "
            "(its `gradient_clipping` config), where no callback can see them. Use FSDP2 (`fsdp=...` with "
            "`fsdp_config={'version': 2}`), which GradGuardCallback supports with global norms, clipping and skips, "
            "or DDP (`torchrun`)."
        )
    max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if max_norm > 0 and is_rank_zero():
        twice = f" GradGuardCallback(clip={clip!r}) then clips a second time." if clip is not None else ""
        warn(
            f"GradGuardCallback: the Trainer clips the gradients (`max_grad_norm={max_norm:g}`, its default is 1.0) "
            "before any callback runs, so the guard measures them after that clip: its norms are at most "
            f"{max_norm:g}, and a non-finite gradient has spread to every layer by then (the origin layer is lost)."
            f"{twice} Set `TrainingArguments(max_grad_norm=0)` and clip in the guard, "
            f"`GradGuardCallback(clip=NormClip({max_norm:g}))`: the same clip, after the guard has measured."
        )


def cadence(own: int | None, args: Any, state: Any, steps_per_epoch: int | None) -> int | None:
    """The logging cadence, decided once: the guard's own, else the Trainer's (``logging_strategy``
    ``"steps"``: ``state.logging_steps``, a ratio of ``max_steps`` already resolved; ``"epoch"``: the
    optimizer steps of an epoch; ``"no"``: never)."""
    if own is not None:
        return own
    strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
    if strategy == "steps":
        n = int(getattr(state, "logging_steps", 0) or 0)
        return n if n > 0 else None
    if strategy == "epoch":
        return steps_per_epoch
    return None


@dataclass(frozen=True)
class DataLayout:
    """How the Trainer draws its data: optimizer steps per epoch, micro-batches per step and batches per
    epoch (None for a loader without a length).

    Example::

        >>> layout = DataLayout(steps_per_epoch=4, accumulate=2, batches=8)
        >>> layout.positions(5)          # epoch 1, its second step: two micro-batches
        [(1, 2), (1, 3)]
        >>> DataLayout(2, 2, 3).positions(3)   # the last step of an epoch is short
        [(1, 2)]
        >>> DataLayout(None, 1, None).positions(7)   # no length: listed by the step
        [(0, 7)]
    """

    steps_per_epoch: int | None
    accumulate: int
    batches: int | None

    @classmethod
    def of(cls, args: Any, train_dataloader: Any) -> DataLayout:
        """As the Trainer counts it (``set_initial_training_values``)."""
        accumulate = max(int(args.gradient_accumulation_steps), 1)
        try:
            batches = len(train_dataloader)
        except TypeError:
            return cls(None, accumulate, None)
        return cls(max(batches // accumulate + int(batches % accumulate > 0), 1), accumulate, batches)

    def positions(self, global_step: int) -> list[tuple[int, int]]:
        """The (epoch, batch index) of each micro-batch of optimizer step ``global_step``: the skip list's
        names for them (a resumed Trainer fast-forwards its data to the same batches)."""
        if self.steps_per_epoch is None or self.batches is None:
            return [(0, global_step)]
        epoch, step = divmod(global_step, self.steps_per_epoch)
        first = step * self.accumulate
        return [(epoch, b) for b in range(first, min(first + self.accumulate, self.batches))]


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def why_no_replay() -> str | None:
    """Where the guard cannot replay a faulty step under the Trainer, or None."""
    if world_size() > 1:
        return (
            "under data parallelism each rank holds its own batch and the Trainer's model wrapper is accelerate's: "
            "a replay is not yet run there; the fault's layers and origin are still reported"
        )
    return None


def reducer() -> Callable[[Tensor], Tensor] | None:
    """Sums the step's flags across ranks (one ``all_reduce``), or None on one process."""
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    def reduce(flags: Tensor) -> Tensor:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return flags

    return reduce


def gatherer() -> Callable[[Any], list[Any]] | None:
    """Gathers a host object from every rank (the per-timestep profiles), or None on one process."""
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    def gather(local: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, local)
        return out

    return gather


def sharded(model: Any) -> bool:
    """FSDP1's gradients are flat-view shards (FSDP2's are DTensors, which the core recognises)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


def resumed_state(state: Any) -> dict[str, Any] | None:
    """The guard's state in the checkpoint the Trainer resumed from (``trainer_state.json``'s
    ``stateful_callbacks``), or None for a fresh run."""
    if not getattr(state, "global_step", 0):
        return None
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_NAME)
    if isinstance(saved, list):  # several guards in one Trainer: the first's
        saved = saved[0] if saved else None
    if not isinstance(saved, dict):
        return None
    guard = saved.get("attributes", {}).get("_saved_guard_state")
    return guard if isinstance(guard, dict) else None


def scaler_unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the fp16 gradients before the guard measures them, unless the Trainer's clipping already
    did (``accelerator.clip_grad_norm_`` unscales): the GradScaler then does not unscale them again."""
    from torch.amp.grad_scaler import OptState

    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    if stage is OptState.READY:
        scaler.unscale_(optimizer)
