"""The Hugging Face Trainer adapter: :class:`GradGuardCallback` is a :class:`~lightning_gradguard.GuardCore`
that is also a ``transformers.TrainerCallback``, and translates each Trainer event into one core call.
It holds hooks only: what it needs of the Trainer is read by :mod:`.trainer`, the batch and the loss
are taken from the model's forward pass by :mod:`.inputs`, the real skip is :mod:`.skip`'s, and where
the metrics go is :mod:`.reporting`'s.

It takes the core's options as they are declared on :class:`~lightning_gradguard.GuardCore`, and adds
the Lightning adapter's own (images, histograms, dumps), with the same defaults.

Event timing it relies on (``Trainer._inner_training_loop``, transformers 5):

* ``on_train_begin`` runs after the model, the optimizer (accelerate's ``AcceleratedOptimizer``) and
  the scheduler exist, after a resumed run's state is loaded, and after the ``TensorBoardCallback``
  chose its directory.
* ``on_step_begin`` runs once per optimizer step, before its first micro-batch.
* ``on_pre_optimizer_step`` runs once per optimizer step, after gradient accumulation and DDP's
  all-reduce, *after* the Trainer's own ``max_grad_norm`` clipping (so ask for ``max_grad_norm=0``)
  and before ``optimizer.step()``: the guard measures, clips and decides there.
* ``on_optimizer_step`` runs after ``optimizer.step()`` and before the Trainer steps the LR scheduler
  unless ``accelerator.optimizer_step_was_skipped``: a skipped step raises that signal there.
* ``global_step`` counts every step, skipped ones included (the data moves on); the LR schedule
  counts the updates that were applied.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without transformers
    raise ImportError(
        "lightning_gradguard's GradGuardCallback needs Hugging Face transformers (and accelerate, which its Trainer "
        "needs): pip install 'lightning-gradguard[transformers]'"
    ) from exc

from lightning_gradguard.clip import Clipper
from lightning_gradguard.core.guard import GuardCore, StepReport
from lightning_gradguard.dump import Dumper
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.integrations.transformers import reporting, skip
from lightning_gradguard.integrations.transformers import trainer as trainer_glue
from lightning_gradguard.integrations.transformers.inputs import ForwardTap
from lightning_gradguard.notify.wandb import WandbAlert
from lightning_gradguard.tensorboard.sink import TensorBoardSink

__all__ = ["GradGuardCallback"]

_ADAPTER_SETS = ("model", "sharded", "process_group")  # core options the adapter takes from the Trainer
log = logging.getLogger(__name__)


class GradGuardCallback(GuardCore, TrainerCallback, ExportableState):
    """Measure, guard and clip the gradients of every optimizer step of Hugging Face's ``Trainer``.

    ``Trainer(..., args=TrainingArguments(..., max_grad_norm=0), callbacks=[GradGuardCallback(clip=NormClip(1.0))])``:
    the same guard as Lightning's :class:`~lightning_gradguard.GradGuard`, with the same options.

    Logged metrics: those of :class:`~lightning_gradguard.GradGuard` (``gradguard/total_norm``,
    ``gradguard/layer/<layer>``, the clipper's, ``gradguard/skipped_steps``, ...), on the guard's logging
    steps, to TensorBoard (with ``report_to`` including ``"tensorboard"``: the Trainer's TensorBoard
    directory, with the GradGuard tab's data) and to the Trainer's other reporters at its next log.

    A logging step is one with ``(state.global_step + 1) % n == 0``, ``n`` being ``log_every_n_steps``
    (default: the Trainer's ``logging_steps``): the step the Trainer logs at ``global_step + 1``.

    A skipped step (non-finite, a skipped spike, a rollback) leaves the weights, every optimizer state
    tensor and its step count, and the LR scheduler's state as they were (see :mod:`.skip`);
    ``state.global_step`` still counts it.

    Cost: every step one ``_foreach_norm`` pass over the gradients and one host read (the skip
    decision, which the LR scheduler's hold needs on the host); per-layer work on logging steps only.

    Args:
        clip: a clipper (:class:`~lightning_gradguard.NormClip`, ...) applied in ``on_pre_optimizer_step``,
            or None. Set ``TrainingArguments(max_grad_norm=0)``: the Trainer clips before any callback runs.
        log_every_n_steps: the logging cadence; None (default) follows the Trainer's ``logging_steps``
            (``logging_strategy="epoch"``: once an epoch; ``"no"``: never).
        dump_dir: a directory for dumps of the first non-finite or spike step (the step's last
            micro-batch as the model was called with it, RNG states, model and optimizer state).
        max_dumps: at most this many dump files (default 5).
        log_histograms: per-layer gradient histograms in TensorBoard on logging steps (default False).
        images_in_background: draw the TensorBoard images on a background thread (default True).
        images: draw the matplotlib images at all (default True).
        **core_options: every other option of :class:`~lightning_gradguard.GuardCore`, declared,
            documented and validated there, with the same defaults. The adapter sets ``model`` and
            ``sharded`` itself.

    Raises:
        ValueError: an argument is out of range (the message names it); at ``on_train_begin``, DeepSpeed,
            or a guard the Trainer re-created from a checkpoint (``restore_callback_states_from_checkpoint``).
        TypeError: an argument has the wrong type.

    Example::

        >>> from lightning_gradguard import NormClip
        >>> guard = GradGuardCallback(clip=NormClip(max_norm=1.0))
        >>> guard.on_nonfinite, guard.skipped_steps
        ('skip', 0)
        >>> GradGuardCallback(on_nonfinite="ignore")
        Traceback (most recent call last):
        ...
        ValueError: Expected `on_nonfinite` to be one of 'skip', 'warn', 'raise', 'stop', but got 'ignore'.
    """

    def __init__(
        self,
        clip: Clipper | None = None,
        *,
        log_every_n_steps: int | None = None,
        dump_dir: str | None = None,
        max_dumps: int = 5,
        log_histograms: bool = False,
        images_in_background: bool = True,
        images: bool = True,
        **core_options: Any,
    ) -> None:
        for name in _ADAPTER_SETS:
            if name in core_options:
                raise TypeError(f"GradGuardCallback sets `{name}` itself (from the Trainer); do not pass it.")
        user = core_options.pop("components", ())
        components = [*user, skip.HostDecision()] if isinstance(user, (list, tuple)) else user
        super().__init__(
            None, clip=clip, log_every_n_steps=log_every_n_steps, sharded=False, process_group=None,
            components=components, **core_options,
        )  # fmt: skip
        self.dumper = Dumper(dump_dir, max_dumps)
        self.sink = TensorBoardSink(
            log_histograms=log_histograms, images_in_background=images_in_background, images=images
        )
        self._own_cadence = log_every_n_steps  # None: the Trainer's, read at on_train_begin
        self._hold = skip.SchedulerHold()
        self._last_report: StepReport | None = None
        self._tap: ForwardTap | None = None
        self._tensorboard: reporting.TensorBoardLogger | None = None
        self._reporters: list[Any] = []
        self._unreported: dict[str, float] = {}  # metrics not yet handed to the Trainer's reporters
        self._wandb: WandbAlert | None = None
        self._data = trainer_glue.DataLayout(None, 1, None)
        self._reduce: Callable[[Tensor], Tensor] | None = None  # sums the step's flags across ranks
        self._step_now = 0
        self._saved_guard_state: dict[str, Any] | None = None  # set by the Trainer when it re-creates a guard
        self.replay_off: str | None = None  # why this run's faults are not replayed

    @property
    def core(self) -> GuardCore:
        """The guard's core: this object itself (a GradGuardCallback is a GuardCore)."""
        return self

    @property
    def dumps(self) -> list[str]:
        """The dump files written so far."""
        return self.dumper.paths

    @property
    def last_report(self) -> StepReport | None:
        """The report of the latest optimizer step."""
        return self._last_report

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._saved_guard_state is not None:  # set by the Trainer only, on a guard it re-created
            raise ValueError(
                "GradGuardCallback was re-created by the Trainer from its checkpoint "
                "(`TrainingArguments(restore_callback_states_from_checkpoint=True)`), with default options: its "
                "clipper and handlers cannot be stored in trainer_state.json. Leave that argument False: the guard "
                "restores its own state from the checkpoint it resumes from."
            )
        model, optimizer, scheduler = kwargs["model"], kwargs["optimizer"], kwargs.get("lr_scheduler")
        trainer_glue.check_trainer(args, optimizer, self.clip)
        handler = trainer_glue.find_handler()
        saved = trainer_glue.resumed_state(state)
        if saved is not None:
            self.load_state_dict(saved)
        self._data = trainer_glue.DataLayout.of(args, kwargs.get("train_dataloader"))
        self.log_every_n_steps = trainer_glue.cadence(self._own_cadence, args, state, self._data.steps_per_epoch)
        self._reduce = trainer_glue.reducer()
        self.sharded = trainer_glue.sharded(model)
        inner = skip.inner_optimizer(optimizer)
        scaler = getattr(optimizer, "scaler", None)
        self.prepare(model, [inner], schedulers=[scheduler] if scheduler is not None else [], scaler=scaler,
                     gather_profiles=trainer_glue.gatherer(), log_dir=args.output_dir)  # fmt: skip
        if not skip.SchedulerHold.supported(optimizer):
            self._warn_once("hold", "GradGuardCallback: the optimizer is not accelerate's AcceleratedOptimizer, so "
                                    "a skipped step cannot hold the LR scheduler back: it steps on skipped steps too.")
        recovery = self.component("recovery")
        if recovery is not None:
            user = self.__dict__.setdefault("_user_on_rollback", getattr(recovery, "on_rollback", None))
            recovery.chain_model_hook(model, user)  # type: ignore[attr-defined]
        self._tap = ForwardTap(model, lambda: self.begin_step(self._step_now), self.observe_loss)
        self.replay_off = trainer_glue.why_no_replay() if self.component("replay") is not None else None
        if self.replay_off is not None and state.is_world_process_zero:
            log.info("GradGuard: faults are not replayed in this run: %s", self.replay_off)
        self._tensorboard = reporting.open_tensorboard(handler, state.is_world_process_zero)
        loggers = [self._tensorboard] if self._tensorboard is not None else []
        self.sink.attach(loggers, self.alerts, state.is_world_process_zero, self.config())
        self._reporters = reporting.reporters(handler)
        self._wandb = reporting.connect_wandb(handler, self.alerts, self._wandb, state.is_world_process_zero)
        self.alerts.run_name = args.run_name or args.output_dir

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_now = state.global_step
        for epoch, batch_idx in self._data.positions(state.global_step):
            self.note_batch(epoch, batch_idx)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs["optimizer"]
        inner = skip.inner_optimizer(optimizer)
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            trainer_glue.scaler_unscaled(scaler, inner)
        tap = self._tap
        if tap is not None:
            self.dumper.begin_batch(tap.batch(), state.global_step)
        self.dumper.end_step()
        try:
            report = self.step(
                inner, step=state.global_step, scaler=scaler, reduce=self._reduce,
                replay_closure=tap.closure() if tap is not None and self.replay_off is None else None,
            )  # fmt: skip
        except NonFiniteGradientError as exc:
            self._maybe_dump(state, kwargs["model"], inner, exc.event)
            self._finish()
            raise
        self._last_report = report
        self._maybe_dump(state, kwargs["model"], inner, report.event)
        if report.metrics:
            if self._tensorboard is not None:
                self._tensorboard.log_metrics(report.metrics, step=report.step)
            loggers = [self._tensorboard] if self._tensorboard is not None else []
            self.sink.write(loggers, report, state.is_world_process_zero)
            self._unreported.update(report.metrics)
        if report.should_stop:
            control.should_training_stop = True

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        report = self._last_report
        self._hold.after_step(kwargs["optimizer"], skipped=report is not None and report.skipped)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        metrics, self._unreported = self._unreported, {}
        reporting.forward_metrics(self._reporters, metrics, args, state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish()
        if state.is_world_process_zero:
            log.info(self.summary())

    def _finish(self) -> None:
        """The deferred steps, the images in flight, the last events and the run's summary reach the event
        file, which is closed; the model's hooks are removed."""
        with contextlib.suppress(GradGuardError):  # a deferred step raising again: its event is recorded
            self.close()
        self.sink.finish(self.steps, self.log_every_n_steps, self.summary())
        self.sink.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self.unwatch()

    def _maybe_dump(self, state: Any, model: Any, optimizer: Any, event: Any) -> None:
        path = self.dumper.maybe_dump(
            event, global_step=state.global_step, epoch=int(state.epoch or 0), model_state=model.state_dict,
            optimizer_state=optimizer.state_dict,
            rank=trainer_glue.rank() if trainer_glue.world_size() > 1 else None,
        )  # fmt: skip
        if path is not None and state.is_world_process_zero:
            log.info("GradGuard: wrote a dump of step %d (%s) to %s", state.global_step, event.kind, path)

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """The guard's state in the Trainer's checkpoint (``trainer_state.json``'s ``stateful_callbacks``):
        plain values, read back at ``on_train_begin`` of a run resumed from it."""
        return {"args": {}, "attributes": {"_saved_guard_state": {**self.state_dict(), **self.dumper.state_dict()}}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.dumper.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_report"], state["_tap"], state["_tensorboard"], state["_reporters"] = None, None, None, []
        return state
