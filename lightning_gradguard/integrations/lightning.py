"""The Lightning adapter: :class:`GradGuard` is a :class:`~lightning_gradguard.GuardCore` that is also a
Lightning ``Callback``, and translates each Trainer hook into one core call.

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
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.clip import Clipper
from lightning_gradguard.core.guard import GuardCore, StepReport
from lightning_gradguard.dump import Dumper
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.notify.wandb import WandbAlert
from lightning_gradguard.tensorboard.sink import TensorBoardSink

__all__ = ["GradGuard"]

# Strategies that set the model up after the callbacks' `setup` (configure_model, wrapping): the guard
# names layers and attaches its hooks at `on_fit_start`, once the parameters are the final ones.
_ENGINE_OWNED = ("DeepSpeedStrategy",)
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


def _silent(*args: Any, **kwargs: Any) -> None:
    """``self.log`` during a replay: the replay's values must not reach the run's metrics."""


def _run_name(trainer: pl.Trainer) -> str:
    """The run's name in alerts: the first logger's name and version, else the root directory's name."""
    for logger in trainer.loggers:
        name, version = getattr(logger, "name", None), getattr(logger, "version", None)
        if name:
            return f"{name}/{version}" if version not in (None, "") else str(name)
    return os.path.basename(os.path.abspath(trainer.default_root_dir))


def _profile_gatherer(trainer: pl.Trainer) -> Callable[[dict[str, list[float]]], list[dict[str, list[float]]]]:
    """Gathers a logging step's per-timestep profiles from every data-parallel rank (host lists, once
    per logging step): tensor-parallel ranks share their inputs, so only the data-parallel ones."""
    import torch.distributed as dist

    mesh: Any = getattr(trainer.strategy, "device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    group = mesh["data_parallel"].get_group() if "data_parallel" in names else None

    def gather(local: dict[str, list[float]]) -> list[dict[str, list[float]]]:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, local, group=group)
        return out

    return gather


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
        strategy = type(trainer.strategy).__name__
        if strategy in _ENGINE_OWNED:
            raise MisconfigurationException(
                f"GradGuard does not support `{strategy}`: DeepSpeed owns and partitions the gradients (under "
                "ZeRO-2/3 `p.grad` is None) and clips and skips steps inside its engine (its `gradient_clipping` "
                "config), where no callback can see them. Use strategy='fsdp' or ModelParallelStrategy (FSDP2, "
                "tensor parallel), which GradGuard supports with global norms, clipping and skips, or strategy='ddp'."
            )
        self.sharded = strategy == "FSDPStrategy"  # FSDP1's gradients are flat-view shards
        if trainer.gradient_clip_val and self.clip is not None:
            rank_zero_warn(
                f"GradGuard clips with {self.clip!r} and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
                "is also set: gradients would be clipped twice (GradGuard first, then Lightning). "
                "Remove one of them."
            )
        if not any(p.requires_grad for p in pl_module.parameters()):
            rank_zero_warn(
                "GradGuard: the model has no trainable parameters (none, or all frozen): there is nothing to "
                "measure, clip or guard."
            )
        if self.recovery is not None:  # the skip list's file, beside the logs (read back on resume)
            self.recovery.set_log_dir(trainer.default_root_dir)
        self.sink.attach(trainer.loggers, self.alerts, trainer.is_global_zero, self.config())
        self.alerts.run_name = _run_name(trainer)
        self._connect_wandb(trainer)

    def _connect_wandb(self, trainer: pl.Trainer) -> None:
        """With a ``WandbLogger``, alarms also go to ``wandb.alert`` (rate-limited like the others)."""
        notifiers = self.alerts.notifiers
        if self._wandb in notifiers:
            notifiers.remove(self._wandb)
        self._wandb = None
        found = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if found and trainer.is_global_zero:
            self._wandb = WandbAlert(getattr(found[0], "experiment", None))
            notifiers.append(self._wandb)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup: FSDP2 and tensor parallelism replace the
        # parameters (DTensors) after the callbacks' `setup`, so naming them there would go stale.
        gather = _profile_gatherer(trainer) if trainer.world_size > 1 else None
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        try:  # e.g. AGC refuses a placement that splits its units
            self.prepare(pl_module, trainer.optimizers, schedulers=schedulers, scaler=scaler, gather_profiles=gather)
        except ValueError as exc:
            raise MisconfigurationException(str(exc)) from None
        if all(type(opt).__name__ == "_MockOptimizer" for opt in trainer.optimizers):
            rank_zero_warn(
                "GradGuard: the LightningModule configures no optimizer (`configure_optimizers` returned None): "
                "there is no optimizer step to guard, measure or clip."
            )
        if self.recovery is not None:
            self._hook_module(pl_module)
            self.recovery.begin_run()
        self._replay_off = self._why_no_replay(trainer, pl_module) if self.replay else None
        if self.replay and self._replay_off is None:
            self._hook_ddp(trainer)
        if self._replay_off is not None:
            rank_zero_info(f"GradGuard: faults are not replayed in this run: {self._replay_off}")

    def _hook_ddp(self, trainer: pl.Trainer) -> None:
        """Under DDP the gradients the guard sees are averaged over the ranks, so a NaN from one rank
        is on every rank. A communication hook (the default all-reduce, plus one device-side
        ``isfinite`` per bucket, no sync) keeps whether this rank's own gradients were finite, so that a
        replay can name the faulty rank. Not when the strategy already has a hook of its own."""
        strategy = trainer.strategy
        model = getattr(strategy, "model", None)
        if type(strategy).__name__ != "DDPStrategy" or getattr(strategy, "_ddp_comm_hook", None) is not None:
            return
        if not callable(getattr(model, "register_comm_hook", None)):
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state: Any, bucket: Any) -> Any:
            bad = (~torch.isfinite(bucket.buffer())).any()
            seen = self.local_grad_fault
            self.local_grad_fault = bad if seen is None else seen | bad
            return default_hooks.allreduce_hook(state, bucket)

        hook.__annotations__ = {}  # DDP checks the annotations, which postponed evaluation turns into strings
        model.register_comm_hook(None, hook)  # type: ignore[union-attr]

    @staticmethod
    def _why_no_replay(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Where a replay cannot work: sharded strategies and manual optimization."""
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

    def _hook_module(self, pl_module: pl.LightningModule) -> None:
        """After a rollback, the LightningModule's ``on_gradguard_rollback(event)`` (when it defines one)
        runs after the ``on_rollback`` option's callable: the state the guard cannot see."""
        recovery = self.recovery
        assert recovery is not None
        user = self.__dict__.setdefault("_user_on_rollback", recovery.on_rollback)
        hook = getattr(pl_module, "on_gradguard_rollback", None)

        def on_rollback(event: GradEvent) -> None:
            if user is not None:
                user(event)
            if callable(hook):
                hook(event)

        recovery.on_rollback = on_rollback if (user is not None or callable(hook)) else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        clip = self.clip
        if scaler is None or clip is None or not clip.deferred:
            return
        for opt in trainer.optimizers:
            if getattr(opt, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"GradGuard cannot apply {clip!r} with the fused optimizer {type(opt).__name__} under fp16: "
                    "its gradients are still scaled in on_before_optimizer_step. Use NormClip, which is exact "
                    "on scaled gradients, or a non-fused optimizer."
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.dumper.begin_batch(batch, batch_idx)
        self._replay_batch = (batch, batch_idx)  # a reference: a replay of this step runs on it
        self.note_batch(trainer.current_epoch, batch_idx)
        self.begin_step(trainer.global_step, log=self._is_logging_step(trainer))

    def _cadence(self, trainer: pl.Trainer) -> int:
        """The logging cadence: the guard's own, else the Trainer's (set dynamically; 0 there means
        Lightning never logs)."""
        return self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))

    def _is_logging_step(self, trainer: pl.Trainer, step: int | None = None) -> bool:
        n = self._cadence(trainer)
        return n > 0 and ((trainer.global_step if step is None else step) + 1) % n == 0

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.observe_loss(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        strategy = trainer.strategy

        def reduce(flags: Tensor) -> Tensor:
            return strategy.reduce(flags, reduce_op="sum")

        self.dumper.end_step()
        try:
            report = self.step(
                optimizer,
                step=trainer.global_step,
                log=self._is_logging_step(trainer),
                scaler=getattr(trainer.precision_plugin, "scaler", None),
                optimizer_idx=next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0),
                reduce=reduce if trainer.world_size > 1 else None,
                log_next=self._is_logging_step(trainer, trainer.global_step + 1),
                replay_closure=self._replay_closure(trainer, pl_module),
                replay_precision=self._replay_precision(trainer),
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

    def _replay_closure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], Any] | None:
        """``training_step`` again on the step's (last) batch, with ``self.log`` silenced. The core runs it
        with the module's attributes as they were at ``on_train_batch_start`` (a carried hidden state
        the step has replaced since), and puts them back afterwards."""
        kept = self.__dict__.get("_replay_batch")
        if not self.replay or kept is None or self._replay_off is not None:
            return None
        batch, batch_idx = kept

        def closure() -> Any:
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

        return closure

    @staticmethod
    def _replay_precision(trainer: pl.Trainer) -> Callable[[], Any] | None:
        """The run's autocast (its precision plugin's forward context), or None for a float32 run."""
        if str(trainer.precision) in ("32-true", "32", "64-true", "64"):
            return None
        return trainer.precision_plugin.forward_context  # type: ignore[no-any-return]

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
        self.sink.finish(trainer.global_step, self._cadence(trainer), self.summary())

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
