"""Snapshots of a run's state, restored in place: what a rollback goes back to.

A :class:`Snapshot` holds everything a rollback must restore: the model's parameters and buffers,
every optimizer's state and hyperparameters, the LR schedulers, the fp16 GradScaler, the guard's own
state and the RNG states. :class:`SnapshotRing` keeps the ``keep`` most recent ones, in host memory
or on disk.

* **In place.** :meth:`Snapshot.restore` copies the saved values into the *same* tensors
  (``tensor.copy_``), so that references held by the user, the optimizer, DDP or FSDP see them.
  Optimizer state that did not exist at the snapshot (the first snapshot comes before any step) is
  removed again.
* **Local.** Under DDP, FSDP and tensor parallelism each rank copies its own local shards
  (``DTensor.to_local()``): nothing is gathered, and a restore is a local copy on every rank.
* **Asynchronous on a GPU.** Device tensors are copied into pinned host buffers with
  ``non_blocking=True`` on the current stream: the host does not wait (no sync), and the copies are
  ordered before the optimizer step that follows them on that stream. The buffers of the snapshot
  that falls out of the ring are reused.

Cost: one copy of the parameters, the buffers and the optimizer state per snapshot, per rank.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.dump import capture_rng, restore_rng
from lightning_gradguard.errors import GradGuardError

__all__ = ["RestoreError", "Snapshot", "SnapshotRing", "Targets", "local_tensor"]


class RestoreError(GradGuardError):
    """A snapshot could not be taken or restored (a missing file, a changed model): training must not go on."""


def local_tensor(t: Tensor) -> Tensor:
    """This rank's own storage of ``t``: the local shard of a ``DTensor``, ``t`` itself otherwise
    (detached, so that an in-place copy into it is not recorded by autograd)."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        with torch.no_grad():
            return to_local().detach()  # type: ignore[no-any-return]
    return t.detach()


@dataclass
class Targets:
    """What a snapshot covers (set once the run's objects exist).

    ``guard_state``/``load_guard_state`` save and restore the guard's own state (detector and
    clipper statistics); ``lr_keys`` are the hyperparameters a learning-rate backoff scales.
    """

    model: nn.Module | None = None
    optimizers: Sequence[torch.optim.Optimizer] = ()
    schedulers: Sequence[Any] = ()
    scaler: Any = None
    guard_state: Callable[[], dict[str, Any]] = dict
    load_guard_state: Callable[[dict[str, Any]], None] = lambda state: None

    def model_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The model's parameters and buffers, by name (each shared tensor once)."""
        if self.model is None:
            return
        yield from (("p:" + n, p) for n, p in self.model.named_parameters())
        yield from (("b:" + n, b) for n, b in self.model.named_buffers())


@dataclass
class Snapshot:
    """A run's state at the start of optimizer step ``step`` (before its update).

    ``position`` is the batch being trained then (``(epoch, batch_idx)``, or None); ``lr_scale`` the
    learning-rate backoff factor in force when it was taken.
    """

    step: int
    position: tuple[int, int] | None = None
    lr_scale: float = 1.0
    tensors: dict[str, Tensor] = field(default_factory=dict)
    optim: list[dict[str, Any]] = field(default_factory=list)  # per optimizer: groups (hyperparameters), state
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    guard: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # on disk: the tensors and the optimizer state live in this file

    # ------------------------------------------------------------- capture
    @classmethod
    def take(cls, step: int, targets: Targets, *, position: tuple[int, int] | None = None,
             lr_scale: float = 1.0, reuse: Snapshot | None = None) -> Snapshot:  # fmt: skip
        """Copy the state of ``targets`` (no host sync: device tensors go to pinned host memory
        asynchronously). ``reuse``: a dropped snapshot whose host buffers are recycled."""
        old = reuse.tensors if reuse is not None and reuse.path is None else {}
        snap = cls(step, position, lr_scale)
        snap.tensors = {name: _host_copy(local_tensor(t), old.get(name)) for name, t in targets.model_tensors()}
        old_optim = reuse.optim if reuse is not None and reuse.path is None else []
        for i, opt in enumerate(targets.optimizers):
            reuse_state = old_optim[i]["state"] if i < len(old_optim) else []
            snap.optim.append(_optimizer_copy(opt, reuse_state))
        snap.schedulers = [copy.deepcopy(s.state_dict()) for s in targets.schedulers]
        snap.scaler = copy.deepcopy(targets.scaler.state_dict()) if _scaler_on(targets.scaler) else None
        snap.guard = copy.deepcopy(targets.guard_state())
        snap.rng = capture_rng()
        return snap

    @property
    def nbytes(self) -> int:
        """The bytes of tensors the snapshot holds (parameters, buffers, optimizer state)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        for opt in self.optim:
            total += sum(
                v.numel() * v.element_size() for s in opt["state"] for v in s.values() if isinstance(v, Tensor)
            )
        return total

    def to_disk(self, directory: str | os.PathLike[str], rank: int) -> None:
        """Move the tensors and optimizer state into a file (one per snapshot and rank)."""
        path = Path(directory) / f"gradguard-snapshot-rank{rank}-step{self.step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"tensors": self.tensors, "optim": self.optim}, tmp)
        os.replace(tmp, path)
        self.path, self.tensors, self.optim = str(path), {}, []

    def discard(self) -> None:
        """Remove the snapshot's file, if it has one."""
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)

    # ------------------------------------------------------------- restore
    def restore(self, targets: Targets) -> None:
        """Copy the snapshot back into ``targets``, in place, bit for bit.

        Raises:
            RestoreError: the file is gone or unreadable, or the model or an optimizer no longer
                matches the snapshot (a parameter added, removed or reshaped).
        """
        tensors, optim = self.tensors, self.optim
        if self.path is not None:
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise RestoreError(
                    f"GradGuard could not read the snapshot of step {self.step} at {self.path}: {exc}"
                ) from exc
            tensors, optim = saved["tensors"], saved["optim"]
        live = dict(targets.model_tensors())
        if set(live) != set(tensors):
            changed = sorted(set(live) ^ set(tensors))[:5]
            raise RestoreError(
                f"GradGuard cannot restore the snapshot of step {self.step}: the model's parameters and buffers "
                f"changed since it was taken ({', '.join(n[2:] for n in changed)})."
            )
        if len(optim) != len(targets.optimizers):
            raise RestoreError(
                f"GradGuard cannot restore the snapshot of step {self.step}: it holds {len(optim)} optimizers, "
                f"the run has {len(targets.optimizers)}."
            )
        with torch.no_grad():
            for name, t in live.items():
                _copy_into(local_tensor(t), tensors[name], name[2:], self.step)
            for opt, saved_opt in zip(targets.optimizers, optim, strict=True):
                _restore_optimizer(opt, saved_opt, self.step)
        for sched, state in zip(targets.schedulers, self.schedulers, strict=False):
            sched.load_state_dict(copy.deepcopy(state))
        if self.scaler is not None and _scaler_on(targets.scaler):
            targets.scaler.load_state_dict(copy.deepcopy(self.scaler))
        targets.load_guard_state(copy.deepcopy(self.guard))
        restore_rng(self.rng)


class SnapshotRing:
    """The ``keep`` most recent snapshots, oldest first, in memory or in ``directory``.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> ring = SnapshotRing(keep=2)
        >>> targets = Targets(model)
        >>> for step in (0, 10, 20):
        ...     _ = ring.take(step, targets)
        >>> [s.step for s in ring.snapshots]
        [10, 20]
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ring.snapshots[-1].restore(targets)
        >>> torch.equal(model.weight, ring.snapshots[-1].tensors["p:weight"])
        True
    """

    def __init__(self, keep: int = 2, directory: str | None = None, rank: int = 0) -> None:
        self.keep = keep
        self.directory = directory
        self.rank = rank
        self.snapshots: list[Snapshot] = []

    def take(self, step: int, targets: Targets, *, position: tuple[int, int] | None = None,
             lr_scale: float = 1.0) -> Snapshot:  # fmt: skip
        """Take a snapshot and keep it; the oldest one beyond ``keep`` is dropped (its buffers reused)."""
        dropped = self.snapshots.pop(0) if len(self.snapshots) >= self.keep else None
        snap = Snapshot.take(step, targets, position=position, lr_scale=lr_scale, reuse=dropped)
        if dropped is not None:
            dropped.discard()
        if self.directory is not None:
            snap.to_disk(self.directory, self.rank)
        self.snapshots.append(snap)
        return snap

    def drop_after(self, index: int) -> None:
        """Forget the snapshots newer than ``snapshots[index]`` (they lie after a rolled-back state)."""
        for snap in self.snapshots[index + 1 :]:
            snap.discard()
        del self.snapshots[index + 1 :]

    def clear(self) -> None:
        """Forget every snapshot (and remove their files)."""
        for snap in self.snapshots:
            snap.discard()
        self.snapshots.clear()

    def __len__(self) -> int:
        return len(self.snapshots)


# ------------------------------------------------------------------- helpers
def _host_copy(t: Tensor, buffer: Tensor | None) -> Tensor:
    """A host copy of ``t``: into ``buffer`` when it fits, else a new (pinned, for device tensors) one."""
    if t.device.type == "cpu":
        if buffer is not None and buffer.shape == t.shape and buffer.dtype == t.dtype and buffer is not t:
            return buffer.copy_(t)
        return t.clone(memory_format=torch.contiguous_format)
    if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
        buffer = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return buffer.copy_(t, non_blocking=True)


def _optimizer_copy(opt: torch.optim.Optimizer, reuse: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer's hyperparameters (per group) and each parameter's state (tensors copied)."""
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state: list[dict[str, Any]] = []
    index = 0
    for g in opt.param_groups:
        for p in g["params"]:
            old = reuse[index] if index < len(reuse) else {}
            entry = {}
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    entry[key] = _host_copy(
                        local_tensor(value), old.get(key) if isinstance(old.get(key), Tensor) else None
                    )
                else:
                    entry[key] = copy.deepcopy(value)
            state.append(entry)
            index += 1
    return {"groups": groups, "state": state}


def _restore_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any], step: int) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != len(saved["state"]) or len(opt.param_groups) != len(saved["groups"]):
        raise RestoreError(
            f"GradGuard cannot restore the snapshot of step {step}: {type(opt).__name__} has "
            f"{len(params)} parameters in {len(opt.param_groups)} groups, the snapshot "
            f"{len(saved['state'])} in {len(saved['groups'])}."
        )
    for group, hyper in zip(opt.param_groups, saved["groups"], strict=True):
        for key, value in hyper.items():
            group[key] = copy.deepcopy(value)
    for i, (p, entry) in enumerate(zip(params, saved["state"], strict=True)):
        live = opt.state.get(p)
        if not entry:
            opt.state.pop(p, None)  # no state then (before the first step): none now
            continue
        if live is None:
            live = opt.state[p] = {}
        for key in [k for k in live if k not in entry]:
            del live[key]
        for key, value in entry.items():
            current = live.get(key)
            if isinstance(value, Tensor):
                mine = local_tensor(current) if isinstance(current, Tensor) else None
                if mine is not None and mine.shape == value.shape and mine.dtype == value.dtype:
                    _copy_into(mine, value, f"optimizer state {key} of parameter {i}", step)
                else:
                    live[key] = _new_state(value, current if isinstance(current, Tensor) else p)
            else:
                live[key] = copy.deepcopy(value)


def _new_state(saved: Tensor, like: Tensor) -> Tensor:
    """A state tensor that did not exist any more: placed like ``like`` (a DTensor shard as a DTensor)."""
    local = saved.clone().to(local_tensor(like).device)
    mesh = getattr(like, "device_mesh", None)
    if mesh is not None and saved.dim() > 0:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, mesh, like.placements, run_check=False)  # type: ignore[attr-defined]
    return local


def _copy_into(target: Tensor, saved: Tensor, what: str, step: int) -> None:
    if target.shape != saved.shape or target.dtype != saved.dtype:
        raise RestoreError(
            f"GradGuard cannot restore the snapshot of step {step}: {what} is {tuple(target.shape)} "
            f"{target.dtype} now, {tuple(saved.shape)} {saved.dtype} in the snapshot."
        )
    target.copy_(saved, non_blocking=target.device.type != "cpu")


def _scaler_on(scaler: Any) -> bool:
    return scaler is not None and bool(getattr(scaler, "is_enabled", lambda: True)())
