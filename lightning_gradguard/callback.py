"""The Lightning adapter: translates Trainer hooks into :class:`~lightning_gradguard.core.GuardCore` calls.

Hook timing it relies on (see ``LIGHTNING_NOTES.md``):

* ``on_before_backward`` sees each micro-batch's loss: the guard notes whether it is finite.
* ``on_before_optimizer_step`` runs once per optimizer step, after gradient accumulation, after
  DDP's all-reduce and after the fp16 GradScaler's ``unscale_``, and *before* Lightning's own
  ``gradient_clip_val`` clipping. The guard measures, detects, clips and skips there.
* Skipping sets every gradient of the optimizer to None: torch optimizers then leave the weights and
  their state untouched. ``global_step`` and LR schedulers still advance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_gradguard.clip import Clipper
from lightning_gradguard.core import GroupBy, GuardCore, OnNonFinite, StepReport
from lightning_gradguard.dashboard import TensorBoardSink
from lightning_gradguard.dump import Dumper
from lightning_gradguard.errors import NonFiniteGradientError
from lightning_gradguard.events import GradEvent

__all__ = ["GradGuard"]

# Strategies that set the model up after the callbacks' `setup` (configure_model, wrapping): the guard
# names layers and attaches its hooks at `on_fit_start`, once the parameters are the final ones.
_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")
_ENGINE_OWNED = ("DeepSpeedStrategy",)


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


class GradGuard(_Base):
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
                                        :mod:`~lightning_gradguard.timesteps`)
    ==================================  ==========================================================

    With a ``TensorBoardLogger``, each tracked sequence also gets an image ``gradguard/timestep/<name>``:
    a heatmap of log10 per-timestep norms over recent logging steps (needs matplotlib), and the
    GradGuard tab in TensorBoard gets its data (:mod:`~lightning_gradguard.tabdata`).

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
        norm_type: order of every norm, ``> 0``; ``float('inf')`` for the max-norm.
        on_nonfinite: ``"skip"`` (default: drop the optimizer step), ``"warn"``, ``"raise"``
            (:class:`~lightning_gradguard.NonFiniteGradientError`) or ``"stop"`` (skip, then set
            ``trainer.should_stop``).
        max_consecutive_skips: this many skipped steps in a row raise
            :class:`~lightning_gradguard.NonFiniteGradientError`.
        log_every_n_steps: the logging cadence; None follows ``trainer.log_every_n_steps``.
        group_by: ``"layer"`` (the module owning the parameters) or ``"parameter"``.
        track_timesteps: track per-timestep gradient norms of every ``nn.RNN``/``LSTM``/``GRU`` and
            recurrent cell (True), none (False), or only the named modules (a list).
        timestep_vanish_ratio: a ``first_last_ratio`` below this gives a ``vanishing_in_time`` event,
            above its reciprocal an ``exploding_in_time`` event (at most one per 100 steps each).
        explode_threshold: an ``exploding`` event when the total norm before clipping exceeds it
            (default None: off).
        spike_zscore: a ``spike`` event when log(total norm) is this many standard deviations above
            its EMA (default 6.0; None: off). Costs nothing extra on healthy steps.
        spike_warmup: finite steps that only feed the spike statistics (default 50).
        vanish_threshold: a per-layer norm below it counts as vanishing (default 1e-8).
        vanish_ratio: a per-layer ‖g‖/‖w‖ below it counts as vanishing (default None: off).
        vanish_patience: consecutive logging steps below a threshold before a ``vanishing`` event
            (default 3). Layers with exactly-zero gradients are reported once as ``dead``, layers
            requiring grad without a gradient once as ``unused``.
        min_loss_scale: a ``loss_scale_collapse`` alarm when the fp16 GradScaler's scale falls below
            it (default 1.0).
        alert_every: the same kind of event on the same layers is logged at most once per this many
            steps (default 100), with a count of the suppressed ones. ``guard.events`` and handlers
            get every event.
        alert_handlers: callables ``handler(event)`` called with every event on rank zero. One that
            raises is logged once; training goes on. See the README for a webhook example.
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
        norm_type: float = 2.0,
        on_nonfinite: OnNonFinite = "skip",
        max_consecutive_skips: int = 25,
        log_every_n_steps: int | None = None,
        group_by: GroupBy = "layer",
        track_timesteps: bool | list[str] = True,
        timestep_vanish_ratio: float = 1e-4,
        explode_threshold: float | None = None,
        spike_zscore: float | None = 6.0,
        spike_warmup: int = 50,
        vanish_threshold: float = 1e-8,
        vanish_ratio: float | None = None,
        vanish_patience: int = 3,
        min_loss_scale: float = 1.0,
        alert_every: int = 100,
        alert_handlers: list[Callable[[GradEvent], Any]] | None = None,
        dump_dir: str | None = None,
        max_dumps: int = 5,
        log_histograms: bool = False,
        images_in_background: bool = True,
        images: bool = True,
    ) -> None:
        # Each argument is validated once, by the part that owns it: the core, the dumper, the sink.
        # The adapter's own `log_every_n_steps=None` means "the Trainer's": it always tells the core.
        self.core = GuardCore(
            clip=clip,
            norm_type=norm_type,
            on_nonfinite=on_nonfinite,
            max_consecutive_skips=max_consecutive_skips,
            group_by=group_by,
            log_every_n_steps=log_every_n_steps,
            track_timesteps=track_timesteps,
            timestep_vanish_ratio=timestep_vanish_ratio,
            explode_threshold=explode_threshold,
            spike_zscore=spike_zscore,
            spike_warmup=spike_warmup,
            vanish_threshold=vanish_threshold,
            vanish_ratio=vanish_ratio,
            vanish_patience=vanish_patience,
            min_loss_scale=min_loss_scale,
            alert_every=alert_every,
            alert_handlers=alert_handlers,
        )
        self.dumper = Dumper(dump_dir, max_dumps)
        self.sink = TensorBoardSink(
            log_histograms=log_histograms, images_in_background=images_in_background, images=images
        )

    # ------------------------------------------------------------ read-only
    @property
    def clip(self) -> Clipper | None:
        """The clipper, or None."""
        return self.core.clip

    @property
    def on_nonfinite(self) -> str:
        """The non-finite policy."""
        return self.core.on_nonfinite

    @property
    def log_every_n_steps(self) -> int | None:
        """The logging cadence; None follows the Trainer's."""
        return self.core.log_every_n_steps

    @property
    def events(self) -> list[GradEvent]:
        """Every recorded event, oldest first."""
        return self.core.events

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far."""
        return self.core.skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        """Non-finite steps so far."""
        return self.core.nonfinite_steps

    @property
    def timestep_norms(self) -> dict[str, Tensor]:
        """Each tracked sequence's per-timestep norms at the last logging step (1-D CPU tensors)."""
        return self.core.timestep_norms

    @property
    def dumps(self) -> list[str]:
        """The dump files written so far."""
        return self.dumper.paths

    @property
    def last_report(self) -> StepReport | None:
        """The report of the latest optimizer step."""
        return self._last_report

    _last_report: StepReport | None = None

    def summary(self) -> str:
        """The one-paragraph summary printed at the end of fit."""
        return self.core.summary()

    @property
    def state_key(self) -> str:
        # Lightning asks for it on every hook call (it names the profiler action): made once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(
                clip=repr(self.core.clip),
                norm_type=self.core.norm_type,
                on_nonfinite=self.core.on_nonfinite,
                group_by=self.core.group_by,
            )
        return key

    # ---------------------------------------------------------------- hooks
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
        self.core.sharded = strategy == "FSDPStrategy"  # FSDP1's gradients are flat-view shards
        if trainer.gradient_clip_val and self.core.clip is not None:
            rank_zero_warn(
                f"GradGuard clips with {self.core.clip!r} and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
                "is also set: gradients would be clipped twice (GradGuard first, then Lightning). "
                "Remove one of them."
            )
        if not any(p.requires_grad for p in pl_module.parameters()):
            rank_zero_warn(
                "GradGuard: the model has no trainable parameters (none, or all frozen): there is nothing to "
                "measure, clip or guard."
            )
        self.sink.attach(trainer.loggers, self.core.alerts, trainer.is_global_zero, self.core)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup: FSDP2 and tensor parallelism replace the
        # parameters (DTensors) after the callbacks' `setup`, so naming them there would go stale.
        self.core.watch(pl_module)
        self.core.gather_profiles = _profile_gatherer(trainer) if trainer.world_size > 1 else None
        for optimizer in trainer.optimizers:  # e.g. AGC refuses a placement that splits its units
            try:
                self.core.clipping.check(self.core.layers.layout(optimizer))
            except ValueError as exc:
                raise MisconfigurationException(str(exc)) from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        clip = self.core.clip
        if scaler is None or clip is None or not clip.deferred:
            return
        for opt in trainer.optimizers:
            if getattr(opt, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"GradGuard cannot apply {clip!r} with the fused optimizer {type(opt).__name__} under fp16: "
                    "its gradients are still scaled in on_before_optimizer_step. Use NormClip, which is exact "
                    "on scaled gradients, or a non-fused optimizer."
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.dumper.begin_batch(batch, batch_idx)
        self.core.begin_step(trainer.global_step, log=self._is_logging_step(trainer))

    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        # The Trainer sets `log_every_n_steps` dynamically; 0 there means Lightning never logs.
        n = self.core.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        return n > 0 and (trainer.global_step + 1) % n == 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.core.observe_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        strategy = trainer.strategy

        def reduce(flags: Tensor) -> Tensor:
            return strategy.reduce(flags, reduce_op="sum")

        self.dumper.end_step()
        try:
            report = self.core.step(
                optimizer,
                step=trainer.global_step,
                log=self._is_logging_step(trainer),
                scaler=getattr(trainer.precision_plugin, "scaler", None),
                optimizer_idx=next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0),
                reduce=reduce if trainer.world_size > 1 else None,
            )
        except NonFiniteGradientError as exc:
            self._maybe_dump(trainer, pl_module, optimizer, exc.event)
            raise
        self._last_report = report
        self._maybe_dump(trainer, pl_module, optimizer, report.event)
        if report.metrics:
            for logger in trainer.loggers:
                logger.log_metrics(report.metrics, step=report.step)
            layout = self.core.layers.layout(optimizer)
            self.sink.write(trainer.loggers, self.core, report, layout, trainer.is_global_zero)
        if report.should_stop:
            trainer.should_stop = True

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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.flush()  # steps deferred under on_nonfinite="warn"
        self.sink.close()  # the images in flight reach the event file before the logger closes

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.core.summary())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sink.close()
        self.core.unwatch()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**self.core.state_dict(), **self.dumper.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
        self.dumper.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_report"] = None
        return state
