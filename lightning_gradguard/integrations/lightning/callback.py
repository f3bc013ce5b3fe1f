"""The Lightning callback: :class:`GradGuard` is a :class:`~lightning_gradguard.GuardCore` that is also a
Lightning ``Callback``, and translates each Trainer hook into one core call. It holds hooks only: what it
needs of the Trainer is read by :mod:`.trainer`, replaying a step by :mod:`.replay`.

It takes the core's options as they are declared on :class:`~lightning_gradguard.GuardCore` (the way
Lightning's ``SpikeDetection`` inherits Fabric's), and adds only its own: the TensorBoard images and
histograms, and dumps.

Hook timing it relies on:

* ``on_before_backward`` sees each micro-batch's loss: the guard notes whether it is finite.
* ``on_before_optimizer_step`` runs once per optimizer step, after gradient accumulation, after
  DDP's all-reduce and after the fp16 GradScaler's ``unscale_``, and *before* Lightning's own
  ``gradient_clip_val`` clipping. The guard measures, detects, clips and skips there.
* Skipping sets every gradient of the optimizer to None: torch optimizers then leave the weights and
  their state untouched. ``global_step`` and LR schedulers still advance.
* FSDP2 and tensor parallelism replace the parameters after the callbacks' ``setup``, so the guard
  names the layers at ``on_fit_start``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.clip import Clipper
from lightning_gradguard.core.guard import GuardCore, StepReport
from lightning_gradguard.dump import Dumper
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.integrations.lightning import replay
from lightning_gradguard.integrations.lightning import trainer as trainer_glue
from lightning_gradguard.integrations.lightning.checkpoints import SaveGate
from lightning_gradguard.notify.wandb import WandbAlert
from lightning_gradguard.tensorboard.sink import TensorBoardSink

__all__ = ["GradGuard"]

_ADAPTER_SETS = ("model", "sharded", "process_group")  # core options the adapter takes from the Trainer


def _callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning``'s Callback, plus ``lightning.pytorch``'s when the unified package is installed.

    Each Trainer checks ``isinstance(callback, Callback)`` against its *own* namespace's class, which
    is why mixing the two packages gives cryptic errors (Lightning issues #17485, #20628). Deriving
    from both makes one GradGuard class that either Trainer accepts.
    """
    bases: list[type] = [Callback]
    try:
        from lightning.pytorch.callbacks import Callback as UnifiedCallback
    except ImportError:
        return tuple(bases)
    if UnifiedCallback is not Callback:  # type: ignore[comparison-overlap]
        bases.append(UnifiedCallback)
    return tuple(bases)


if TYPE_CHECKING:
    _Base = Callback
else:
    _Base = type("_GradGuardBase", _callback_bases(), {"__module__": __name__})


class GradGuard(GuardCore, _Base):
    """Measure, guard and clip the gradients of every optimizer step.

    One class for both Lightning namespaces: it derives from ``pytorch_lightning``'s ``Callback``
    and, when the unified ``lightning`` package is installed, from ``lightning.pytorch``'s too, so a
    ``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer`` both accept it
    (``lightning_gradguard.lightning.GradGuard`` is the same class).

    Logged metrics (on logging steps, to every logger in ``trainer.loggers``):

    ==================================  ==========================================================
    ``gradguard/total_norm``            total gradient norm before clipping
    ``gradguard/total_norm_clipped``    total norm after clipping (only when ``clip`` is set)
    ``gradguard/clip_coef``             the scale factor clipping applied (1.0: no change)
    ``gradguard/clip_threshold``        the clipper's threshold in force
    ``gradguard/clipped_fraction``      share of the steps since the last log that were clipped
    ``gradguard/clipped_units``         layers (LayerNormClip) or rows (AGC) clipped
    ``gradguard/layer/<layer>``         each layer's gradient norm before clipping
    ``gradguard/skipped_steps``         skipped steps so far (cumulative)
    ``gradguard/nonfinite_steps``       non-finite steps so far (cumulative)
    ``gradguard/timestep/<name>/...``   ``first_last_ratio``, ``log10_first_last``, ``decay_per_step``
                                        and ``horizon`` of each tracked sequence (see
                                        :mod:`~lightning_gradguard.core.timesteps`)
    ==================================  ==========================================================

    With a ``TensorBoardLogger``, each tracked sequence also gets an image ``gradguard/timestep/<name>``:
    a heatmap of log10 per-timestep norms over recent logging steps (needs matplotlib), and the
    GradGuard tab in TensorBoard gets its data (:mod:`~lightning_gradguard.tensorboard.format`).

    A logging step is one with ``(trainer.global_step + 1) % n == 0``, ``n`` being
    ``log_every_n_steps`` (default: the Trainer's). Logging steps follow that cadence with or without
    a logger; per-layer work happens only on them.

    Cost: every step one ``_foreach_norm`` pass over the gradients and one host sync (the skip
    decision). ``ValueClip`` adds one more read on logging steps.

    Args:
        clip: a clipper (:class:`~lightning_gradguard.NormClip`, :class:`~lightning_gradguard.ValueClip`,
            :class:`~lightning_gradguard.LayerNormClip`, :class:`~lightning_gradguard.AGC`,
            :class:`~lightning_gradguard.AutoClip`, :class:`~lightning_gradguard.ZClip`)
            applied in ``on_before_optimizer_step``, or None for no clipping.
        log_every_n_steps: the logging cadence; None (default here) follows ``trainer.log_every_n_steps``.
        dump_dir: a directory for dumps of the first non-finite or spike step (and the first of each
            new origin): batch, RNG states, model and optimizer state before the step, the event.
            Read one with :func:`lightning_gradguard.load_dump`. Default None: no dumps.
        max_dumps: at most this many dump files (default 5).
        log_histograms: also write per-layer gradient histograms to TensorBoard on logging steps
            (default False). Each histogram copies its layer's gradients to the host: on a GPU this
            is one device-to-host copy of every gradient per logging step.
        images_in_background: draw TensorBoard images on a background thread (default True), so that
            training does not wait for matplotlib; a logging step that comes while the previous
            images are still being drawn skips its own (all images of a step are drawn together,
            and the last logging step of a fit is always drawn). False draws every logging step's
            images on the training thread.
        images: draw the matplotlib images (``gradguard/flow``, ``gradguard/timestep/<name>``) at
            all (default True: they also reach tools other than TensorBoard). The GradGuard tab in
            TensorBoard draws its heatmaps in the browser from the logged data, so its users can
            turn the images off and save their drawing time.
        **core_options: every other option of :class:`~lightning_gradguard.GuardCore`
            (``norm_type``, ``on_nonfinite``, ``max_consecutive_skips``, ``group_by``,
            ``track_timesteps``, the detectors' thresholds, ``alert_every``, ``alert_handlers``, ...),
            declared, documented and validated there, with the same defaults. The adapter sets
            ``sharded`` and the model itself.

    Raises:
        ValueError: an argument is out of range (the message names it).
        TypeError: an argument has the wrong type.

    Example::

        >>> from lightning_gradguard import GradGuard, NormClip
        >>> guard = GradGuard(clip=NormClip(max_norm=1.0))
        >>> guard.on_nonfinite, guard.skipped_steps
        ('skip', 0)
        >>> GradGuard(on_nonfinite="ignore")
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
                raise TypeError(f"GradGuard sets `{name}` itself (from the Trainer); do not pass it.")
        # The model and its sharding come from the Trainer (at setup and on_fit_start).
        super().__init__(
            None, clip=clip, log_every_n_steps=log_every_n_steps, sharded=False, process_group=None, **core_options
        )
        self.dumper = Dumper(dump_dir, max_dumps)
        self.sink = TensorBoardSink(
            log_histograms=log_histograms, images_in_background=images_in_background, images=images
        )
        self._last_report: StepReport | None = None
        self._replay_off: str | None = None  # why this run's faults are not replayed
        self._wandb: WandbAlert | None = None
        self._own_cadence = log_every_n_steps  # None: the Trainer's, read at setup
        self._saves: SaveGate | None = None  # the user's ModelCheckpoints, gated (checkpoints option)

    @property
    def core(self) -> GuardCore:
        """The guard's core: this object itself (a GradGuard is a GuardCore)."""
        return self

    @property
    def dumps(self) -> list[str]:
        """The dump files written so far."""
        return self.dumper.paths

    @property
    def last_report(self) -> StepReport | None:
        """The report of the latest optimizer step."""
        return self._last_report

    @property
    @override
    def state_key(self) -> str:
        # Lightning asks for it on every hook call (it names the profiler action): made once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(
                clip=repr(self.clip), norm_type=self.norm_type, on_nonfinite=self.on_nonfinite, group_by=self.group_by
            )
        return key

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.sharded = trainer_glue.check_trainer(trainer, pl_module, self.clip)
        self.log_every_n_steps = trainer_glue.cadence(self._own_cadence, trainer)  # decided once, here
        self.sink.attach(trainer.loggers, self.alerts, trainer.is_global_zero, self.config())
        self.alerts.run_name = trainer_glue.run_name(trainer)
        self._wandb = trainer_glue.connect_wandb(trainer, self.alerts, self._wandb)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup: FSDP2 and tensor parallelism replace the
        # parameters (DTensors) after the callbacks' `setup`, so naming them there would go stale. After
        # a resume's state is loaded too: the skip file is merged with it, or started empty.
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        try:  # e.g. AGC refuses a placement that splits its units
            self.prepare(
                pl_module,
                trainer.optimizers,
                schedulers=schedulers,
                scaler=self._scaler(trainer),
                gather_profiles=trainer_glue.profile_gatherer(trainer),
                log_dir=trainer.default_root_dir,
            )
        except ValueError as exc:
            raise MisconfigurationException(str(exc)) from None
        trainer_glue.warn_without_optimizer(trainer)
        recovery = self.component("recovery")
        if recovery is not None:
            user = self.__dict__.setdefault("_user_on_rollback", getattr(recovery, "on_rollback", None))
            recovery.chain_model_hook(pl_module, user)  # type: ignore[attr-defined]
        replayer = self.component("replay")
        self._replay_off = replay.why_no_replay(trainer, pl_module) if replayer is not None else None
        if replayer is not None and self._replay_off is None:
            replay.keep_local_faults(trainer, replayer)
        if self._replay_off is not None:
            rank_zero_info(f"GradGuard: faults are not replayed in this run: {self._replay_off}")
        gate = self.component("checkpoints")
        if gate is not None:
            self._saves = SaveGate(self, gate)  # type: ignore[arg-type]
            self._saves.attach(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.dumper.begin_batch(batch, batch_idx)
        self._replay_batch = (batch, batch_idx)  # a reference: a replay of this step runs on it
        self.note_batch(trainer.current_epoch, batch_idx)
        self.begin_step(trainer.global_step)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.observe_loss(loss)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        strategy = trainer.strategy
        kept = self.__dict__.get("_replay_batch")
        closure = replay.replay_closure(pl_module, *kept) if kept is not None and self._replay_off is None else None
        self.dumper.end_step()
        try:
            report = self.step(
                optimizer,
                step=trainer.global_step,
                scaler=self._scaler(trainer),
                optimizer_idx=next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0),
                reduce=(lambda flags: strategy.reduce(flags, reduce_op="sum")) if trainer.world_size > 1 else None,
                replay_closure=closure,
                replay_precision=replay.replay_precision(trainer),
            )
        except NonFiniteGradientError as exc:
            self._maybe_dump(trainer, pl_module, optimizer, exc.event)
            raise
        self._last_report = report
        self._maybe_dump(trainer, pl_module, optimizer, report.event)
        if report.metrics:
            for logger in trainer.loggers:
                logger.log_metrics(report.metrics, step=report.step)
            self.sink.write(trainer.loggers, report, trainer.is_global_zero)
        if report.should_stop:
            trainer.should_stop = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._saves is not None:
            self._saves.after_batch(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._saves is not None:
            self._saves.on_save(trainer, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        gate = self.component("checkpoints")
        if gate is not None:
            SaveGate(self, gate).on_load(trainer, pl_module, checkpoint)  # type: ignore[arg-type]

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def _maybe_dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, event: Any) -> None:
        path = self.dumper.maybe_dump(
            event,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            model_state=pl_module.state_dict,
            optimizer_state=optimizer.state_dict,
            rank=trainer.global_rank if trainer.world_size > 1 else None,
        )
        if path is not None:
            rank_zero_info(f"GradGuard: wrote a dump of step {trainer.global_step} ({event.kind}) to {path}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()  # steps deferred under on_nonfinite="warn"; queued webhook messages
        self._finish_sink(trainer)

    def _finish_sink(self, trainer: pl.Trainer) -> None:
        """The images in flight, the last events and the run's summary reach the event file before the
        logger closes, whatever the cadence (a run shorter than ``log_every_n_steps`` logs no metric)."""
        self.sink.finish(trainer.global_step, self.log_every_n_steps, self.summary())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Before the loggers close: every event up to the one that ended the run (the guard's own
        # stop included) reaches the event file.
        with contextlib.suppress(GradGuardError):  # a deferred step raising again: its event is recorded
            self.close()
        self._finish_sink(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.summary())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saves is not None and stage == "fit":
            self._saves.finish(trainer)  # kept: a trainer.save_checkpoint after fit still gets its record
        self.sink.close()
        self.unwatch()

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.dumper.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.dumper.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_report"] = None
        return state
