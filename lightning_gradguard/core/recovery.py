"""Recovering a run: roll back to a recent snapshot when a fault persists, and keep a skip list.

:class:`Rollback` is the option (``GuardCore(rollback=Rollback(every=100, keep=2))``);
:class:`Recovery` carries it out, step by step, for the guard:

* **Snapshots** (:mod:`.snapshot`): the first before the first optimizer step, then one every
  ``every`` steps, taken only on a step whose flags were read anyway and were healthy (no fault, no
  spike, no streak in progress), so that the check costs nothing.
* **Triggers**, each decided from the step's flags, which are the same on every rank (they ride on the
  step's all-reduce): ``max_consecutive_skips`` reached (a rollback instead of the error), a streak of
  ``nonfinite_losses`` non-finite losses, a confirmed spike (the total norm or the loss above its
  rolling statistics by ``spike_zscore`` for ``spike_patience`` steps in a row), or
  :meth:`~lightning_gradguard.GuardCore.rollback` by hand.
* **The rollback** restores the newest snapshot in place; a fault that recurs within
  ``recur_within`` steps of a rollback goes one snapshot older. The data goes on forward (the batches
  between the snapshot and the fault are not trained on again), the next ``skip_batches`` batches are
  skipped too, the learning rates optionally back off, and a ``rollback`` event says what happened.
  After ``max_rollbacks`` the next trigger raises.
* **The skip list**: one entry per skipped or rolled-back batch (epoch, batch index), with every
  reason it was skipped for and the steps it was seen at (a batch that a deeper rollback undoes
  again is not listed twice), kept in the guard's checkpoint state and in a JSON file; a run resumed
  from a checkpoint skips them again. A batch without a position (a plain loop that does not call
  ``note_batch``) is listed by its step. The file is version 2 (:data:`SKIP_FILE_VERSION`); its
  entries keep version 1's keys (``step``: the first step, ``reason``: the first reason), so that the
  version that wrote version 1 still reads it, and version 1 files (and checkpoints) are read and
  merged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_gradguard._validate import check_int, check_number
from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.core.snapshot import RestoreError, Snapshot, SnapshotRing, Targets
from lightning_gradguard.errors import NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.ranges import batch_count, batch_ranges
from lightning_gradguard.primitives.text import plural

__all__ = ["SKIP_FILE", "SKIP_FILE_VERSION", "Recovery", "Rollback", "rank", "scale_lrs"]

SKIP_FILE = "gradguard_skips.json"  # the skip list's file name, beside the logs
SKIP_FILE_VERSION = 2  # 1: one entry per (batch, step, reason); 2: one per batch, with its reasons and steps
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # what a learning-rate backoff scales in a group
_POSITIONS_KEPT = 100_000  # steps whose batch positions are remembered (bounded memory)


@dataclass(frozen=True)
class Rollback:
    """Keep a ring of recent snapshots, and roll back to one when a fault persists.

    Args:
        every: take a snapshot every this many optimizer steps (an int >= 1), on the first healthy
            step whose flags are read once that many have passed (every step without a fused
            optimizer; logging steps with one).
        keep: how many snapshots to keep (an int >= 1). Each costs one copy of the parameters,
            buffers and optimizer state, per rank.
        max_rollbacks: rollbacks allowed in a run (an int >= 1); the next trigger raises
            :class:`~lightning_gradguard.NonFiniteGradientError`.
        directory: None (default) keeps the snapshots in host memory; a path keeps them in files
            there (one per snapshot and rank).
        on_skips: roll back when ``max_consecutive_skips`` is reached, instead of raising
            (default True).
        nonfinite_losses: roll back after this many non-finite losses in a row (default 3); None:
            off.
        spike_zscore: a confirmed spike rolls back: the total norm (or the observed loss) above its
            rolling statistics by this z-score for ``spike_patience`` steps in a row. None
            (default): off.
        spike_patience: see ``spike_zscore`` (default 3), an int >= 1.
        skip_batches: after a rollback, also skip the next this many batches (default 0).
        lr_backoff: multiply every learning rate by this at each rollback, in (0, 1]; it survives the
            schedulers' next ``step()`` (their base LRs are scaled too). None (default): off.
        recur_within: a trigger this many steps after a rollback or fewer is a recurrence, and rolls
            back one snapshot older than the last one used; default ``every``.
        skip_file: the skip list's JSON file: True (default) puts it beside the logs under Lightning
            (``<default_root_dir>/gradguard_skips.json``; no file in a plain loop), a path puts it
            there, False writes none.

    Raises:
        ValueError: an argument is out of range; the message names it.
        TypeError: an argument has the wrong type.

    Example::

        >>> Rollback(every=100, keep=2).max_rollbacks
        3
        >>> Rollback(keep=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `keep` to be an int >= 1, but got 0.
    """

    every: int = 100
    keep: int = 2
    max_rollbacks: int = 3
    directory: str | None = None
    on_skips: bool = True
    nonfinite_losses: int | None = 3
    spike_zscore: float | None = None
    spike_patience: int = 3
    skip_batches: int = 0
    lr_backoff: float | None = None
    recur_within: int | None = None
    skip_file: str | bool = True

    def __post_init__(self) -> None:
        check_int("every", self.every, minimum=1)
        check_int("keep", self.keep, minimum=1)
        check_int("max_rollbacks", self.max_rollbacks, minimum=1)
        if self.directory is not None and not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(f"Expected `directory` to be a path or None, but got {self.directory!r}.")
        if not isinstance(self.on_skips, bool):
            raise TypeError(f"Expected `on_skips` to be a bool, but got {self.on_skips!r}.")
        check_int("nonfinite_losses", self.nonfinite_losses, minimum=1, allow_none=True)
        check_number("spike_zscore", self.spike_zscore, minimum=0.0, allow_none=True)
        check_int("spike_patience", self.spike_patience, minimum=1)
        check_int("skip_batches", self.skip_batches, minimum=0)
        check_number("lr_backoff", self.lr_backoff, minimum=0.0, maximum=1.0, allow_none=True)
        check_int("recur_within", self.recur_within, minimum=0, allow_none=True)
        if not isinstance(self.skip_file, (bool, str, os.PathLike)):
            raise TypeError(f"Expected `skip_file` to be True, False or a path, but got {self.skip_file!r}.")


class Recovery(GuardComponent):
    """Carries out a :class:`Rollback`: the guard's ``rollback`` component.

    Its hooks: ``gate`` skips a batch of the resumed skip list (or one of the ``skip_batches`` after a
    rollback) without a look, and takes the first snapshot; ``settle`` keeps the streaks, the skip
    list, and rolls back when a trigger fired (the ``spike_high`` flag of the spike statistic counts
    towards a confirmed spike); ``end_step`` takes a snapshot when one is due on a healthy step;
    ``on_skip_limit`` takes over ``max_consecutive_skips``.

    Args:
        config: the options.
        record: records an event (the guard's; set again at :meth:`setup`).
        rank: this process's rank (names the snapshot files; rank 0 writes the skip file).
    """

    name = "recovery"
    order = 80

    def __init__(self, config: Rollback, record: Callable[[GradEvent], GradEvent] = lambda e: e, rank: int = 0) -> None:
        self.options = config
        self.record = record
        self.rank = rank
        self.ring = SnapshotRing(config.keep, None if config.directory is None else str(config.directory), rank)
        self.targets = Targets()
        self.on_rollback: Callable[[GradEvent], Any] | None = None
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._skips: dict[tuple[Any, ...], dict[str, Any]] = {}  # (epoch, batch_idx), or (None, step): entry
        self.replay: set[tuple[int, int]] = set()  # positions to skip again (a resumed run)
        self.resumed = False
        self._saved: dict[str, Any] = {}  # the checkpoint's state of a resumed run
        self.skip_path: str | None = self._path_of(config.skip_file, None)
        self.cause: str | None = None  # a trigger waiting for the end of the step's decision
        self.skip_next = 0
        self._loss_streak = 0
        self._spike_streak = 0
        self._last_capture: int | None = None
        self._last_rollback: int | None = None
        self._last_used: int | None = None  # the step of the snapshot the last rollback restored
        self._batch: list[tuple[int, int]] = []  # positions noted since the last step
        self._positions: dict[int, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------ the hooks
    def chain_model_hook(self, model: Any, user: Callable[[GradEvent], Any] | None) -> None:
        """After a rollback, ``model.on_gradguard_rollback(event)`` (when the model defines one) runs after
        the ``on_rollback`` option's callable ``user``: the state the guard cannot see (an adapter calls
        this at setup, with the model its trainer trains)."""
        hook = getattr(model, "on_gradguard_rollback", None)

        def on_rollback(event: GradEvent) -> None:
            if user is not None:
                user(event)
            if callable(hook):
                hook(event)

        self.on_rollback = on_rollback if (user is not None or callable(hook)) else None

    def setup(self, setup: Setup) -> None:
        """What a snapshot covers; the skip file beside the logs (``setup.log_dir``): a resumed run's is
        merged with its checkpoint's list, a fresh run starts it empty."""
        self.record = setup.record
        targets = self.targets
        if setup.model is not None:
            targets.model = setup.model
        if setup.optimizers:
            targets.optimizers = list(setup.optimizers)
        targets.schedulers, targets.scaler = list(setup.schedulers), setup.scaler
        targets.guard_state, targets.load_guard_state = setup.guard_state, setup.load_guard_state
        self.rank = self.ring.rank = setup.rank
        if setup.log_dir is not None:
            self.set_log_dir(setup.log_dir)
            if self.resumed:
                self._merge_file()
            else:
                self.begin_run()

    def gate(self, ctx: StepContext) -> str | None:
        """Before the step's measurement: the first snapshot, and a batch to skip without a look."""
        targets = self.targets
        if targets.model is None:
            raise RuntimeError(
                "GuardCore(rollback=...) needs the model: pass it to GuardCore(model, ...) or to prepare()."
            )
        if ctx.optimizer not in targets.optimizers:  # a new optimizer: every snapshot must hold it
            targets.optimizers = [*targets.optimizers, ctx.optimizer]
            self.ring.clear()
        why = self.begin(ctx.number)
        self.first(ctx.number)
        return why

    def settle(self, ctx: StepContext) -> None:
        """After the decision: the streaks and the skip list; a rollback if a trigger fired."""
        report, verdict = ctx.report, ctx.verdict
        assert report is not None and verdict is not None
        self.observe_step(ctx.number, verdict.loss_bad, ctx.raised("spike_high"), ctx.skip_reason)
        if ctx.rollback_request is not None:  # another component's (a replica divergence)
            self.request(ctx.rollback_request)
        if self.cause is None:
            return
        ctx.skip(self.cause, rolled_back=True)
        ctx.headline(self.rollback(ctx.number, self.cause, record=ctx.record))

    def end_step(self, ctx: StepContext) -> None:
        """A snapshot when one is due, on a healthy step: once it is settled and detected, so that the
        clipper's and the detectors' statistics all include it."""
        report, verdict = ctx.report, ctx.verdict
        if ctx.deferred or report is None or verdict is None or report.skipped:
            return
        healthy = verdict.finite and not ctx.raised("spike_high")
        if healthy and not self.suspicious and self.due(ctx.number):
            self.capture(ctx.number)

    def restore_points(self) -> list[int]:
        return [snap.step for snap in self.ring.snapshots]

    def checkpoint_veto(self) -> str | None:
        """Not a state to keep: a rollback pending, or a streak in progress."""
        if self.cause is not None:
            return f"a rollback is pending ({self.cause})"
        if self._loss_streak:
            streak = self._loss_streak
            return "the last loss was non-finite" if streak == 1 else f"the last {streak} losses were non-finite"
        if self._spike_streak:
            return f"a spike in progress ({plural(self._spike_streak, 'step')} above the rolling statistics)"
        return None

    def load_legacy(self, state: dict[str, Any]) -> None:
        if "recovery" in state:  # 0.3.0 kept it at the top level
            self.load_state_dict(state["recovery"])

    def snapshot_state(self) -> Any:
        return None  # its counters and skip list go on through a rollback

    def load_snapshot_state(self, state: Any) -> None:
        pass

    # ------------------------------------------------------------ the data
    @staticmethod
    def _path_of(skip_file: str | bool, root: str | None) -> str | None:
        if skip_file is False:
            return None
        if skip_file is True:
            return None if root is None else str(Path(root) / SKIP_FILE)
        return str(skip_file)

    def set_log_dir(self, root: str) -> None:
        """Where the skip file goes when ``skip_file=True`` (the adapter: the Trainer's root directory)."""
        self.skip_path = self._path_of(self.options.skip_file, root)

    def begin_run(self) -> None:
        """Training starts: a fresh run (nothing loaded by :meth:`load_state_dict`) starts the skip
        file empty, since an earlier run's list is not this one's."""
        self.rank = rank()
        if not self.resumed and self.skip_path is not None and Path(self.skip_path).is_file():
            self._write_skip_file()

    def note_batch(self, epoch: int, batch_idx: int) -> None:
        self._batch.append((int(epoch), int(batch_idx)))

    def begin(self, step: int) -> str | None:
        """The step's batches are known: why the step must be skipped without a look (a batch of the
        resumed skip list, or one of the ``skip_batches`` after a rollback), or None."""
        batch, self._batch = self._batch, []
        if batch:
            self._positions[step] = batch
            if len(self._positions) > _POSITIONS_KEPT:
                del self._positions[next(iter(self._positions))]
        if self.skip_next > 0:
            self.skip_next -= 1
            self._add_skips(step, "after rollback")
            return "after rollback"
        if batch and any(pos in self.replay for pos in batch):
            self._add_skips(step, "skip list")
            return "skip list"
        return None

    def _add_skips(self, step: int, reason: str, steps: Sequence[int] | None = None) -> None:
        for s in steps if steps is not None else (step,):
            for epoch, batch_idx in self._positions.get(s, [(None, None)]):  # type: ignore[list-item]
                self._merge(epoch, batch_idx, s, reason)
        self._write_skip_file()

    def _merge(self, epoch: int | None, batch_idx: int | None, step: int, reason: str) -> None:
        """Add one (batch, step, reason) to the skip list: to the batch's entry when it has one."""
        key = (epoch, batch_idx) if epoch is not None else (None, step)  # no position: listed by its step
        entry = self._skips.get(key)
        if entry is None:
            self._skips[key] = {"epoch": epoch, "batch_idx": batch_idx, "step": step, "reason": reason,
                                "steps": [step], "reasons": [reason]}  # fmt: skip
            return
        if reason not in entry["reasons"]:
            entry["reasons"].append(reason)
        if step not in entry["steps"]:
            entry["steps"] = sorted([*entry["steps"], step])
            entry["step"] = entry["steps"][0]

    @property
    def skips(self) -> list[dict[str, Any]]:
        """The skip list, a copy: one entry per batch, ``{"epoch", "batch_idx", "step", "reason", "steps",
        "reasons"}`` (``step`` and ``reason``: the first of ``steps`` and ``reasons``, as version 1 held
        them), ordered by step and position."""
        entries = sorted(self._skips.values(), key=_entry_order)
        return [{**e, "steps": list(e["steps"]), "reasons": list(e["reasons"])} for e in entries]

    # ------------------------------------------------------------ triggers
    def observe_step(self, step: int, loss_bad: bool, spike_high: bool, skipped: str | None) -> None:
        """A settled step's flags, in order: the streaks, and the skip list (``skipped``: why it was
        skipped, or None)."""
        self._loss_streak = self._loss_streak + 1 if loss_bad else 0
        self._spike_streak = self._spike_streak + 1 if spike_high else 0
        if skipped:
            self._add_skips(step, skipped)
        c = self.options
        if c.nonfinite_losses is not None and self._loss_streak >= c.nonfinite_losses:
            self.request(f"{self._loss_streak} non-finite losses in a row (nonfinite_losses={c.nonfinite_losses})")
        elif c.spike_zscore is not None and self._spike_streak >= c.spike_patience:
            self.request(
                f"a confirmed spike: {plural(self._spike_streak, 'step')} in a row above the rolling statistics by "
                f"z > {c.spike_zscore:g} (spike_patience={c.spike_patience})"
            )

    def on_skip_limit(self, cause: str) -> bool:
        """``max_consecutive_skips`` was reached: roll back instead of raising (when ``on_skips``)."""
        if not self.options.on_skips:
            return False
        self.request(cause)
        return True

    def request(self, cause: str) -> None:
        if self.cause is None:
            self.cause = cause

    @property
    def suspicious(self) -> bool:
        """A streak or a trigger is in progress: not a state to keep."""
        return self.cause is not None or self._loss_streak > 0 or self._spike_streak > 0 or self.skip_next > 0

    # ----------------------------------------------------------- snapshots
    def first(self, step: int) -> None:
        """Before the first optimizer step: the snapshot that a fault at any step can go back to."""
        if not self.ring.snapshots and self.targets.model is not None:
            self.capture(step)

    def due(self, step: int) -> bool:
        return self._last_capture is None or step - self._last_capture >= self.options.every

    def capture(self, step: int) -> Snapshot:
        """Take a snapshot of the state before step ``step``'s update."""
        position = self._positions.get(step, [None])[0]  # type: ignore[list-item]
        snap = self.ring.take(step, self.targets, position=position, lr_scale=self.lr_scale)
        self._last_capture = step
        return snap

    # ------------------------------------------------------------ rollback
    def rollback(
        self, step: int, cause: str, manual: bool = False, record: Callable[[GradEvent], GradEvent] | None = None
    ) -> GradEvent:
        """Restore a snapshot in place: the newest, or one older than the last used for a recurrence.

        Raises:
            RestoreError: no snapshot exists yet, or it cannot be restored.
            NonFiniteGradientError: ``max_rollbacks`` rollbacks were already made.
        """
        self.cause = None
        snaps = self.ring.snapshots
        if not snaps:
            raise RestoreError(
                f"GradGuard cannot roll back at step {step} ({cause}): no snapshot exists yet (the first is taken "
                "at the first optimizer step)."
            )
        if self.rollbacks >= self.options.max_rollbacks:
            limit, done = self.options.max_rollbacks, self.rollbacks
            message = (
                f"GradGuard: the run did not recover: {cause} at step {step}, after {done} "
                f"rollback{'' if done == 1 else 's'} (max_rollbacks={limit})."
            )
            event = (record or self.record)(GradEvent("stopped", step=step, message=message, action="raised",
                                          extra={"cause": f"max_rollbacks={limit} reached: {cause}"}))  # fmt: skip
            raise NonFiniteGradientError(message, event)
        index = len(snaps) - 1
        within = self.options.recur_within if self.options.recur_within is not None else self.options.every
        recurring = self._last_rollback is not None and step - self._last_rollback <= within and not manual
        if recurring and self._last_used is not None:
            used = [i for i, s in enumerate(snaps) if s.step == self._last_used]
            index = max(used[0] - 1, 0) if used else index
        snap, depth = snaps[index], len(snaps) - 1 - index
        snap.restore(self.targets)
        self.ring.drop_after(index)
        if self.options.lr_backoff is not None:
            self.lr_scale *= self.options.lr_backoff
        if self.lr_scale != snap.lr_scale:
            scale_lrs(self.targets.optimizers, self.targets.schedulers, self.lr_scale / snap.lr_scale)
        self.rollbacks += 1
        undone = list(range(snap.step, step + 1))  # the steps whose updates are gone
        self._add_skips(step, "rolled back", undone)
        self.skip_next = self.options.skip_batches
        self._last_rollback, self._last_capture, self._last_used = step, step, snap.step
        self._loss_streak = self._spike_streak = 0
        batches = batch_ranges(pos for s in undone for pos in self._positions.get(s, []))
        event = (record or self.record)(GradEvent(
            "rollback", step=step, value=float(snap.step),
            message=(
                f"GradGuard rolled back at step {step} to the snapshot of step {snap.step} ({cause}); "
                f"the updates of steps {snap.step}-{step} undone, the data goes on forward"
                + (f", the next {plural(self.options.skip_batches, 'batch', 'batches')} skipped"
                   if self.options.skip_batches else "")
                + (f", learning rates x{self.lr_scale:g}" if self.lr_scale != 1.0 else "")
                + f". Rollback {self.rollbacks} of at most {self.options.max_rollbacks}."
            ),
            action="rolled back",
            extra={"cause": cause, "from_step": step, "snapshot_step": snap.step, "batch_ranges": batches,
                   "batch_count": batch_count(batches), "skip_next": self.options.skip_batches,
                   "rollbacks": self.rollbacks, "depth": depth, "lr_scale": self.lr_scale, "manual": manual},
        ))  # fmt: skip
        if self.on_rollback is not None:
            self.on_rollback(event)
        return event

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "skips": self.skips,
                "skip_next": self.skip_next}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and the skip list (merged with the skip file's, which may be newer):
        the run is resumed, so its recorded batches are skipped again. Either may hold version 1's
        entries (one per batch, step and reason) or version 2's (one per batch)."""
        saved = dict(state)
        self.resumed = True
        self._saved = saved
        self.skip_next = int(saved.get("skip_next", 0))
        self._merge_file()

    def _merge_file(self) -> None:
        """The checkpoint's list and the skip file's (which may be newer: a run killed after its last
        checkpoint), merged; the newer of the two gives the counters."""
        saved, from_file = self._saved, self._read_skip_file()
        newer = from_file if int(from_file.get("rollbacks", 0)) > int(saved.get("rollbacks", 0)) else saved
        self.rollbacks = int(newer.get("rollbacks", 0))
        self.lr_scale = float(newer.get("lr_scale", 1.0))
        self._skips = {}
        for entry in [*saved.get("skips", []), *from_file.get("skips", [])]:
            epoch, batch_idx = entry.get("epoch"), entry.get("batch_idx")
            if epoch is not None:
                epoch, batch_idx = int(epoch), int(batch_idx)
            for s in entry.get("steps") or [entry["step"]]:
                for reason in entry.get("reasons") or [entry["reason"]]:
                    self._merge(epoch, batch_idx, int(s), str(reason))
        self.replay = {key for key in self._skips if key[0] is not None}

    def _read_skip_file(self) -> dict[str, Any]:
        if self.skip_path is None or not Path(self.skip_path).is_file():
            return {}
        try:
            data = json.loads(Path(self.skip_path).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_skip_file(self) -> None:
        if self.skip_path is None or self.rank != 0:
            return
        path = Path(self.skip_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = {"version": SKIP_FILE_VERSION, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "skips": self.skips}  # fmt: skip
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: a run killed mid-write leaves the previous list


def _entry_order(entry: dict[str, Any]) -> tuple[int, int, int]:
    """The skip list's order: by the first step, then by position (a batch without one first)."""
    epoch, batch_idx = entry["epoch"], entry["batch_idx"]
    return entry["step"], -1 if epoch is None else epoch, -1 if batch_idx is None else batch_idx


def rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def scale_lrs(optimizers: Sequence[Any], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply every learning rate by ``factor``, where the schedulers will look for it next: each
    group's ``lr`` (and ``initial_lr``, ``max_lr``, ``min_lr``: ``OneCycleLR``) and each scheduler's
    ``base_lrs`` (``LambdaLR`` and the other closed forms recompute from them).

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        >>> scale_lrs([opt], [sched], 0.5)
        >>> sched.step(); opt.param_groups[0]["lr"]
        0.5
    """
    for opt in optimizers:
        for group in opt.param_groups:
            for key in _LR_KEYS:
                value = group.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    group[key] = value * factor
    for sched in schedulers:
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(sched, attr, None)
            if isinstance(values, list):
                setattr(sched, attr, [v * factor if isinstance(v, (int, float)) else v for v in values])
