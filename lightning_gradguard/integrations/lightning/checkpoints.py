"""The checkpoint gate under the Trainer: the user's own ``ModelCheckpoint`` callbacks, gated.

At ``on_fit_start`` each ``ModelCheckpoint`` of the Trainer is gated in place (nothing to configure):

* its save (``_save_checkpoint``) first asks the guard's ``checkpoints`` component whether the state
  is healthy (a collective: every rank saves together, and decides together); an unhealthy save is
  not written, but deferred to the next healthy step (the guard's ``on_train_batch_end`` saves it then,
  through the callback's own top-k and ``last`` logic) or skipped;
* its rotation (``_remove_checkpoint``) keeps the last healthy checkpoint while every newer one is
  unhealthy or quarantined.

A checkpoint the Trainer writes carries the health record (``on_save_checkpoint``), and a resume
from a bad one is refused (``on_load_checkpoint``). A direct ``trainer.save_checkpoint`` is not
deferred (the user asked for it): it is written, marked unhealthy when it is, with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_gradguard.core.checkpoints import HEALTH_KEY, CheckpointGate, SaveVerdict, named_state
from lightning_gradguard.errors import GradGuardError, warn

__all__ = ["SaveGate"]


class SaveGate:
    """The gate's Lightning side, for one fit (see the module's docstring)."""

    def __init__(self, guard: Any, gate: CheckpointGate) -> None:
        self.guard = guard
        self.gate = gate
        self._verdict: SaveVerdict | None = None  # the check of the save in progress
        self._checked: SaveVerdict | None = None  # this step's check: one per step, whatever saves in it
        self._deferred_at: int | None = None  # the step whose save was deferred (one event per step)
        self._quarantines = 0  # the gate's quarantines the callbacks were told of
        self._callbacks: list[Any] = []
        self._held: list[tuple[Callable[[pl.Trainer, str], None], str]] = []  # removals the gate held back

    def attach(self, trainer: pl.Trainer) -> None:
        """Gate every ``ModelCheckpoint`` of ``trainer``."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "_gradguard_gate", None) is self or not hasattr(callback, "_save_topk_checkpoint"):
                continue
            self._gate(callback)
            self._callbacks.append(callback)
        self._quarantines = self.gate.quarantines

    def check(self, trainer: pl.Trainer) -> SaveVerdict:
        """The state's health at this step, checked once (a collective: every rank saves together)."""
        step = trainer.global_step
        if self._checked is None or self._checked.step != step:
            strategy = trainer.strategy
            reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
            self._checked = self.gate.check(step, self.guard.save_vetoes(), reduce)
        return self._checked

    def _healthy(self, trainer: pl.Trainer, filepath: str) -> bool:
        """Whether a save may be written now; if not, it is deferred (or skipped), once per step."""
        verdict = self.check(trainer)
        if not verdict.healthy and self._deferred_at != verdict.step:
            self._deferred_at = verdict.step
            self.gate.defer(verdict, filepath, self.guard.record)
        return verdict.healthy

    def _gate(self, callback: Any) -> None:
        topk, last = callback._save_topk_checkpoint, callback._save_last_checkpoint
        save, remove = callback._save_checkpoint, callback._remove_checkpoint

        # Top-k and last are gated before they choose a name or rotate: an unhealthy save changes
        # nothing of the callback (no rotation of a healthy checkpoint for one never written).
        def gated_topk(trainer: pl.Trainer, candidates: dict[str, Tensor]) -> None:
            if self._healthy(trainer, callback.dirpath or "checkpoints"):
                topk(trainer, candidates)

        def gated_last(trainer: pl.Trainer, candidates: dict[str, Tensor]) -> None:
            if not callback.save_last or self._healthy(trainer, callback.dirpath or "checkpoints"):
                last(trainer, candidates)

        def gated_save(trainer: pl.Trainer, filepath: str) -> None:  # also save_on_exception's direct save
            if not self._healthy(trainer, filepath):
                return
            # Recorded first: the checkpoint's own copy of the guard's state lists it too.
            self._verdict = verdict = self.check(trainer)
            self.gate.saved(filepath, verdict, last=Path(filepath).name.startswith(callback.CHECKPOINT_NAME_LAST))
            try:
                save(trainer, filepath)
            except BaseException:
                self.gate.forget(filepath)
                raise
            finally:
                self._verdict = None
            self._release(trainer)

        def gated_remove(trainer: pl.Trainer, filepath: str) -> None:
            if self.gate.protects(filepath, self.guard.restore_points()):
                self._held.append((remove, filepath))  # removed once no longer needed (_release)
                return
            remove(trainer, filepath)
            self.gate.forget(filepath)

        callback._save_topk_checkpoint = gated_topk
        callback._save_last_checkpoint = gated_last
        callback._save_checkpoint = gated_save
        callback._remove_checkpoint = gated_remove
        callback._gradguard_gate = self

    def _release(self, trainer: pl.Trainer, everything: bool = False) -> None:
        """Remove the checkpoints the rotation was held back from, once no longer protected (all of
        them when the fit ends: its snapshots end with it)."""
        if not self._held:
            return
        points = [] if everything else self.guard.restore_points()
        for remove, path in [held for held in self._held if not self.gate.protects(held[1], points)]:
            self._held.remove((remove, path))
            remove(trainer, path)
            self.gate.forget(path)

    def __getstate__(self) -> dict[str, Any]:
        # The gated callbacks and held removals belong to the live fit (their methods are closures):
        # not part of a pickle of the guard.
        state = self.__dict__.copy()
        state["_callbacks"], state["_held"] = [], []
        return state

    def finish(self, trainer: pl.Trainer) -> None:
        """The fit ended: the checkpoints held back for its snapshots go (no rollback can come)."""
        self._release(trainer, everything=True)

    def after_batch(self, trainer: pl.Trainer) -> None:
        """After each batch: the callbacks forget the checkpoints a rollback quarantined, and a deferred
        save is written on the first healthy step after it (through each callback's own top-k and last
        logic, which the ``ModelCheckpoint`` hooks that run after this one then do not repeat)."""
        if self.gate.quarantines != self._quarantines:
            self._quarantines = self.gate.quarantines
            gone = self.gate.quarantined_paths()
            for callback in self._callbacks:
                _forget_paths(callback, gone)
        pending = self.gate.pending
        if pending is None or trainer.global_step <= pending or not self._callbacks:
            return
        if not self.check(trainer).healthy:
            return
        for callback in self._callbacks:
            if callback._should_skip_saving_checkpoint(trainer):
                continue
            candidates = callback._monitor_candidates(trainer)
            if callback.monitor is None or callback.monitor in candidates:
                callback._save_topk_checkpoint(trainer, candidates)
            callback._save_last_checkpoint(trainer, candidates)
        self.gate.pending = None

    def on_save(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        """The health record of the checkpoint being written."""
        verdict = self._verdict
        if verdict is None:  # a direct trainer.save_checkpoint: written as asked, marked as it is
            verdict = self.check(trainer)
            if not verdict.healthy and trainer.is_global_zero:
                warn(f"GradGuard: trainer.save_checkpoint at step {verdict.step} keeps an unhealthy state "
                     f"({'; '.join(verdict.why)}); it is marked so, and a resume from it is refused.")  # fmt: skip
        checkpoint[HEALTH_KEY] = self.gate.health_record(verdict)

    def on_load(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume from a bad checkpoint (every rank raises the same error).

        Raises:
            GradGuardError: non-finite weights or optimizer state, or an unhealthy health record.
        """
        strategy = trainer.strategy
        reduce = (
            (lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="sum")) if trainer.world_size > 1 else None
        )
        loaded = list(named_state(pl_module, trainer.optimizers))  # a distributed checkpoint: already loaded
        path = str(trainer.ckpt_path) if trainer.ckpt_path else None
        problem = self.gate.resume_problem(checkpoint, path, loaded, reduce)
        if problem is not None:
            raise GradGuardError(problem)


def _forget_paths(callback: Any, gone: set[str]) -> None:
    """A ``ModelCheckpoint`` forgets quarantined checkpoints: its best paths and scores name kept ones."""
    best = callback.best_k_models
    for path in [p for p in best if str(p) in gone]:
        best.pop(path)
    if str(callback.best_model_path) in gone or str(callback.kth_best_model_path) in gone:
        if best:
            pick = min if callback.mode == "min" else max
            callback.best_model_path = pick(best, key=best.get)
            callback.best_model_score = best[callback.best_model_path]
            worst = max if callback.mode == "min" else min
            callback.kth_best_model_path = worst(best, key=best.get)
            callback.kth_value = best[callback.kth_best_model_path]
        else:
            callback.best_model_path = callback.kth_best_model_path = ""
            callback.best_model_score = None
