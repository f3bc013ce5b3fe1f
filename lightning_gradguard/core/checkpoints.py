"""Checkpoints you can trust: a save-time health check, a quarantine after a rollback, no rotation of
the last healthy checkpoint, and no resume from a bad one.

:class:`CheckpointGate` is the guard's ``checkpoints`` component (option :class:`Checkpoints`, on by
default). Before a checkpoint is written (:meth:`CheckpointGate.check`):

* the weights and every optimizer state tensor are checked for non-finite values on the device (one
  fused max-abs norm per (device, dtype) group, each rank its own shards), the flag summed across
  ranks with the caller's ``reduce`` (every rank decides the same), and read once; saves are rare, so
  this is the only cost, and healthy steps that save nothing pay nothing;
* the guard's own state is asked too (:meth:`GuardCore.save_vetoes
  <lightning_gradguard.GuardCore.save_vetoes>`): a run of skipped steps, a rollback pending, a streak
  or a spike in progress.

An unhealthy save is deferred until the run is healthy again (``defer=True``), or skipped, with a
``checkpoint`` event and a warning: it is never written silently. Every checkpoint written carries a
health record (:data:`HEALTH_KEY`: the step, healthy or not and why, the last rollback, the guard's
version), and the gate keeps an index of them beside the checkpoints (:data:`INDEX_FILE`).

After a rollback from step F to the snapshot of step S, the checkpoints written in the undone
interval (S, F] are quarantined (renamed with ``suffix``, or deleted), a ``last`` checkpoint among
them is re-pointed to the newest healthy one (or quarantined with them when there is none), and the
rollback event lists what was quarantined (``extra["quarantined"]``). A checkpoint whose removal
would leave no healthy one (:meth:`CheckpointGate.protects`) is kept by the rotation.

A resume from a checkpoint with non-finite weights or optimizer state, or one marked unhealthy, is
refused (:meth:`CheckpointGate.resume_problem`), naming the first bad tensors and the newest healthy
checkpoint in the same directory; ``allow_unhealthy_resume=True`` allows it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.norms import grad_norms
from lightning_gradguard.primitives.text import plural

__all__ = [
    "HEALTH_KEY",
    "INDEX_FILE",
    "CheckpointGate",
    "Checkpoints",
    "SaveVerdict",
    "named_state",
    "nonfinite_tensors",
]

HEALTH_KEY = "gradguard_health"  # a checkpoint's health record (a top-level key of Lightning's dict)
INDEX_FILE = "gradguard_checkpoints.json"  # the gate's index of the checkpoints it saw, beside them


@dataclass(frozen=True)
class Checkpoints:
    """What the checkpoint gate does (``GuardCore(checkpoints=...)``; ``None`` turns it off).

    Args:
        defer: an unhealthy save waits for the next healthy step (True, default), or is skipped.
        quarantine: after a rollback, the checkpoints of the undone interval are ``"rename"``-d with
            ``suffix`` (default) or ``"delete"``-d.
        suffix: appended to a quarantined checkpoint's name.
        allow_unhealthy_resume: resume from a checkpoint with non-finite values or marked unhealthy
            anyway (default False: refused with a clear error).

    Raises:
        ValueError: an argument is out of range; the message names it.
        TypeError: an argument has the wrong type.

    Example::

        >>> Checkpoints().quarantine
        'rename'
        >>> Checkpoints(quarantine="hide")
        Traceback (most recent call last):
        ...
        ValueError: Expected `quarantine` to be one of 'rename', 'delete', but got 'hide'.
    """

    defer: bool = True
    quarantine: Literal["rename", "delete"] = "rename"
    suffix: str = ".quarantined"
    allow_unhealthy_resume: bool = False

    def __post_init__(self) -> None:
        for name in ("defer", "allow_unhealthy_resume"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected `{name}` to be a bool, but got {getattr(self, name)!r}.")
        if self.quarantine not in ("rename", "delete"):
            raise ValueError(f"Expected `quarantine` to be one of 'rename', 'delete', but got {self.quarantine!r}.")
        if not isinstance(self.suffix, str) or not self.suffix or "/" in self.suffix:
            raise ValueError(f"Expected `suffix` to be a non-empty file-name suffix such as '.quarantined', but got "
                             f"{self.suffix!r}.")  # fmt: skip


@dataclass
class SaveVerdict:
    """The health of the run's state at a save: ``healthy``, and if not, ``why`` (every reason) and
    ``bad`` (the first non-finite tensors of this rank, by name)."""

    step: int
    healthy: bool
    why: list[str] = dataclasses.field(default_factory=list)
    bad: list[str] = dataclasses.field(default_factory=list)


def named_state(model: torch.nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[
        tuple[str, Tensor]]:  # fmt: skip
    """The model's parameters and buffers, and every floating optimizer state tensor, by name (local
    shards of DTensors)."""
    if model is not None:
        yield from ((n, p) for n, p in model.named_parameters())
        yield from ((n, b) for n, b in model.named_buffers())
    for i, opt in enumerate(optimizers):
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        for j, (p, state) in enumerate(opt.state.items()):
            for key, value in state.items():
                if isinstance(value, Tensor):
                    yield f"optimizer {i} {names.get(id(p), f'param {j}')}.{key}", value


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _state_tensors(model: torch.nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]) -> list[Tensor]:
    """What :func:`named_state` yields, floating tensors only, as local tensors and without names: one
    walk over the modules, no per-tensor name (a save's check; names only for a flagged one)."""
    from lightning_gradguard.primitives.norms import dtensor_type

    out: list[Tensor] = []
    if model is not None:
        for module in model.modules():
            out += [t for t in module._parameters.values() if t is not None]
            out += [t for t in module._buffers.values() if t is not None]
    for opt in optimizers:
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor)]
    dtensor = dtensor_type()
    if dtensor is not None:
        out = [t.to_local() if isinstance(t, dtensor) else t for t in out]
    return [t for t in out if t.is_floating_point() or t.is_complex()]


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach()


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[tuple[str, int]]:
    """Each floating tensor with non-finite values, and how many, in order (a host read per bad tensor:
    checkpoints and reports only).

    Example::

        >>> nonfinite_tensors([("w", torch.tensor([1.0, float("nan")])), ("b", torch.zeros(2)), ("n", 3)])
        [('w', 1)]
    """
    out = []
    for name, t in named:
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(_local(t))).sum())
            if bad:
                out.append((name, bad))
    return out


def flat_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor of a nested checkpoint (dicts, lists), by its dotted path."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from flat_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat_tensors(v, f"{prefix}[{i}]")


class CheckpointGate(GuardComponent):
    """The guard's ``checkpoints`` component (see the module's docstring).

    Args:
        options: the :class:`Checkpoints` option.
    """

    name = "checkpoints"
    order = 90

    def __init__(self, options: Checkpoints | None = None) -> None:
        self.options = options or Checkpoints()
        self.records: list[dict[str, Any]] = []  # the checkpoints saved: {"path", "step", "healthy", ...}
        self.pending: int | None = None  # the step of a deferred save, waiting for a healthy one
        self.last_rollback: dict[str, int] | None = None
        self.quarantines = 0  # how many quarantines ran (an adapter syncs its callbacks on a change)
        self.model: torch.nn.Module | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.rank = 0
        self.version = ""

    def setup(self, setup: Setup) -> None:
        from lightning_gradguard import __version__

        self.model, self.optimizers, self.rank = setup.model, list(setup.optimizers), setup.rank
        self.version = __version__

    # ------------------------------------------------------------------ before a save
    def check(self, step: int, vetoes: Sequence[str], reduce: Callable[[Tensor], Tensor] | None = None) -> SaveVerdict:
        """The health of the state a save would keep: the guard's ``vetoes`` and the weights' and the
        optimizer state's finiteness, on the device, summed across ranks by ``reduce``, read once.
        Every rank must call it at the same save (a collective with ``reduce``).

        The screen is each tensor's 2-norm, accumulated in float32 (one ``_foreach_norm`` per
        (device, dtype) group, the vectorized kernel: the max-norm's is many times slower on a CPU): a
        non-finite value makes it non-finite. Finite values whose squares overflow float32 would too,
        so a flagged screen is confirmed by an exact count (a second reduce, only then).
        """
        with torch.no_grad():
            tensors = [t for t in _state_tensors(self.model, self.optimizers) if t.numel()]
        device = tensors[0].device if tensors else _device(self.model)
        bad = torch.zeros((), device=device)
        if tensors:
            bad = (~torch.isfinite(grad_norms(tensors))).sum().float()
        if reduce is not None:
            bad = reduce(bad.reshape(1)).reshape(())
        verdict = SaveVerdict(step, healthy=not vetoes, why=list(vetoes))
        if float(bad) > 0:  # the save's one read; what follows runs only on a flagged screen
            named = [(n, t) for n, t in named_state(self.model, self.optimizers) if _is_float(t)]
            mine = nonfinite_tensors(named)
            exact = float(len(mine))
            if reduce is not None:
                exact = float(reduce(torch.tensor([exact], device=device)).sum())
            if not exact:  # the squares of finite values overflowed: healthy
                return verdict
            verdict.healthy = False
            verdict.bad = [f"{name} ({plural(count, 'non-finite value')})" for name, count in mine[:5]]
            where = f": {', '.join(verdict.bad)}" if verdict.bad else " (on another rank)"
            verdict.why.insert(0, f"non-finite weights or optimizer state{where}")
        return verdict

    def defer(self, verdict: SaveVerdict, path: str, record: Callable[[GradEvent], GradEvent]) -> GradEvent:
        """An unhealthy save is not written: deferred to the next healthy step, or skipped. Recorded
        and warned about, never silent."""
        deferred = self.options.defer
        if deferred and self.pending is None:
            self.pending = verdict.step
        action = "deferred" if deferred else "skipped"
        then = "It is saved at the next healthy step." if deferred else "It is skipped (defer=False)."
        message = (
            f"GradGuard did not save a checkpoint at step {verdict.step} ({path}): {'; '.join(verdict.why)}. {then}"
        )
        return record(GradEvent("checkpoint", step=verdict.step, message=message, action=action,
                                extra={"path": str(path), "why": verdict.why, "bad": verdict.bad}))  # fmt: skip

    def health_record(self, verdict: SaveVerdict) -> dict[str, Any]:
        """What a checkpoint carries about itself (:data:`HEALTH_KEY`)."""
        return {"step": verdict.step, "healthy": verdict.healthy, "why": list(verdict.why),
                "last_rollback": dict(self.last_rollback) if self.last_rollback else None,
                "version": self.version}  # fmt: skip

    def saved(self, path: str, verdict: SaveVerdict, last: bool = False) -> None:
        """A checkpoint was written at ``path``: remembered, and in the index beside it (rank zero)."""
        self.records = [r for r in self.records if r["path"] != str(path)]
        self.records.append({"path": str(path), "step": verdict.step, "healthy": verdict.healthy,
                             "last": last, "quarantined": False})  # fmt: skip
        if verdict.healthy and self.pending is not None and verdict.step >= self.pending:
            self.pending = None
        self._write_index(Path(path).parent)

    def protects(self, path: str, restore_points: Sequence[int] = ()) -> bool:
        """Whether the rotation must keep ``path``: it is the newest healthy checkpoint and every newer
        one is unhealthy or quarantined, or it is the newest from at or before one of
        ``restore_points`` (a rollback there would quarantine every newer one).

        Example::

            >>> gate = CheckpointGate()
            >>> for step in (10, 20, 30):
            ...     gate.records.append({"path": f"s{step}", "step": step, "healthy": True, "quarantined": False})
            >>> gate.protects("s20"), gate.protects("s20", restore_points=[25, 35]), gate.protects("s10", [25])
            (False, True, False)
        """
        healthy = [r for r in self.records if r["healthy"] and not r["quarantined"] and not r.get("last")]
        if not healthy:
            return False
        newest = max(healthy, key=lambda r: r["step"])
        if str(newest["path"]) == str(path) and all(
            not r["healthy"] or r["quarantined"] for r in self.records if r["step"] > newest["step"]
        ):
            return True
        for point in restore_points:
            before = [r for r in healthy if r["step"] <= point]
            if before and str(max(before, key=lambda r: r["step"])["path"]) == str(path):
                return True
        return False

    def forget(self, path: str) -> None:
        """``path`` was removed (the rotation)."""
        self.records = [r for r in self.records if r["path"] != str(path)]
        if self.records:
            self._write_index(Path(path).parent)

    # ------------------------------------------------------------------ after a rollback
    def enrich(self, ctx: StepContext | None, event: GradEvent) -> GradEvent:
        if event.kind != "rollback":
            return event
        snap, start = int(event.extra["snapshot_step"]), int(event.extra["from_step"])
        self.last_rollback = {"from_step": start, "snapshot_step": snap}
        # A checkpoint of global step c holds the updates of steps 0..c-1, a snapshot of step S those of
        # 0..S-1. A rollback during step F (its own update skipped) undoes S..F-1: the checkpoints in
        # (S, F]. One by hand between steps, after the update of step F, undoes S..F: up to F + 1.
        last = start + 1 if event.extra.get("manual") else start
        quarantined = self.quarantine(snap, last)
        if not quarantined:
            return event
        message = f"{event.message.rstrip('.')}; quarantined the checkpoints it undid: {', '.join(quarantined)}."
        return dataclasses.replace(event, message=message, extra={**event.extra, "quarantined": quarantined})

    def quarantine(self, snapshot_step: int, from_step: int) -> list[str]:
        """Quarantine the checkpoints written in (``snapshot_step``, ``from_step``]: they hold updates
        the rollback undid. A ``last`` checkpoint among them points to the newest healthy one instead.
        Files are touched on rank zero; every rank keeps the same records."""
        undone = [r for r in self.records if snapshot_step < r["step"] <= from_step and not r["quarantined"]]
        keep = [r for r in self.records if r not in undone and r["healthy"] and not r["quarantined"]
                and not r.get("last")]  # fmt: skip
        newest = max(keep, key=lambda r: r["step"]) if keep else None
        out = []
        for r in undone:
            path = Path(r["path"])
            if r.get("last") and newest is not None:
                if self.rank == 0:
                    _replace_with(path, Path(newest["path"]))
                r.update(step=newest["step"], healthy=True)
                out.append(f"{path.name} -> {Path(newest['path']).name}")
                continue
            r["quarantined"] = True
            r["quarantined_as"] = None if self.options.quarantine == "delete" else path.name + self.options.suffix
            if self.rank == 0:
                _quarantine(path, self.options)
            out.append(path.name)
        if undone:
            self.quarantines += 1
            self._write_index(Path(undone[0]["path"]).parent)
        return out

    def quarantined_paths(self) -> set[str]:
        """The paths of the checkpoints quarantined (their names before the quarantine)."""
        return {str(r["path"]) for r in self.records if r["quarantined"]}

    # ------------------------------------------------------------------ at a resume
    def resume_problem(
        self,
        checkpoint: Mapping[str, Any],
        path: str | None,
        loaded: Iterable[tuple[str, Any]] = (),
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> str | None:
        """Why ``checkpoint`` (loaded from ``path``) must not be resumed from, or None: non-finite
        weights or optimizer state (the first tensors named), or a health record that says so. Names
        the newest healthy checkpoint in the same directory.

        A distributed checkpoint is loaded into the model in place and holds no ``state_dict``:
        ``loaded`` then gives the live tensors (each rank its shards), and ``reduce`` sums the count of
        bad ones over the ranks, so that every rank refuses, or none. Every rank must call it.
        """
        if self.options.allow_unhealthy_resume:
            return None
        named = list(flat_tensors({k: v for k, v in checkpoint.items() if k in ("state_dict", "optimizer_states")}))
        if "state_dict" not in checkpoint:
            named += list(loaded)
        bad = nonfinite_tensors(named)
        count = float(len(bad))
        if reduce is not None:
            count = float(reduce(torch.tensor([count], device=_device_of(named))).sum())
        record = checkpoint.get(HEALTH_KEY)
        marked = isinstance(record, Mapping) and record.get("healthy") is False
        if not count and not marked:
            return None
        name = Path(path).name if path else "the checkpoint"
        if count:
            where = ", ".join(f"{n} ({plural(c, 'non-finite value')})" for n, c in bad[:5]) or "on another rank"
            why = f"it holds non-finite values: {where}"
        else:
            why = f"its health record says it is unhealthy ({'; '.join(record.get('why') or []) or 'no reason'})"  # type: ignore[union-attr]
        healthy = newest_healthy(Path(path).parent, exclude=path) if path else None
        alternative = f" The newest healthy checkpoint there is {healthy}." if healthy else (
            " No healthy checkpoint was found beside it.")  # fmt: skip
        return (
            f"GradGuard refuses to resume from {name}: {why}.{alternative} Pass "
            "GradGuard(checkpoints=Checkpoints(allow_unhealthy_resume=True)) to resume from it anyway."
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "pending": self.pending,
                "last_rollback": self.last_rollback}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state.get("records", [])]
        self.pending = state.get("pending")
        self.last_rollback = state.get("last_rollback")

    def snapshot_state(self) -> Any:
        return None  # what was saved stays saved through a rollback

    def load_snapshot_state(self, state: Any) -> None:
        pass

    def _write_index(self, directory: Path) -> None:
        if self.rank != 0:
            return
        mine = [r for r in self.records if Path(r["path"]).parent == directory]
        index = directory / INDEX_FILE
        tmp = index.with_name(index.name + ".tmp")
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": 1, "checkpoints": mine}, indent=1))
        os.replace(tmp, index)


def _device_of(named: Sequence[tuple[str, Any]]) -> torch.device:
    for _, t in named:
        if isinstance(t, Tensor):
            return _local(t).device
    return torch.device("cpu")


def _device(model: torch.nn.Module | None) -> torch.device:
    for p in model.parameters() if model is not None else ():
        return _local(p).device
    return torch.device("cpu")


def newest_healthy(directory: Path, exclude: str | None = None) -> str | None:
    """The newest healthy, unquarantined checkpoint the gate indexed in ``directory``, by name, or None."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    rows = [r for r in index.get("checkpoints", []) if r.get("healthy") and not r.get("quarantined")
            and not r.get("last") and Path(r["path"]).exists() and str(r["path"]) != str(exclude)]  # fmt: skip
    return Path(max(rows, key=lambda r: r["step"])["path"]).name if rows else None


def _quarantine(path: Path, options: Checkpoints) -> None:
    if not path.exists():
        return
    if options.quarantine == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        os.replace(path, path.with_name(path.name + options.suffix))


def _replace_with(path: Path, source: Path) -> None:
    """``path`` becomes a copy of ``source`` (a file, or a distributed checkpoint's directory)."""
    if not source.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    if source.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    else:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
