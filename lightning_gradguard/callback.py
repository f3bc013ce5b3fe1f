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

from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_gradguard import dashboard
from lightning_gradguard._validate import check_int
from lightning_gradguard.clip import Clipper
from lightning_gradguard.core import GroupBy, GuardCore, OnNonFinite, StepReport
from lightning_gradguard.events import GradEvent

__all__ = ["GradGuard"]

_SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


class GradGuard(Callback):
    """Measure, guard and clip the gradients of every optimizer step.

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
    ``gradguard/timestep/<name>/...``   ``first_last_ratio``, ``decay_per_step`` and ``horizon`` of
                                        each tracked sequence (see :mod:`~lightning_gradguard.timesteps`)
    ==================================  ==========================================================

    With a ``TensorBoardLogger``, each tracked sequence also gets an image ``gradguard/timestep/<name>``:
    a heatmap of log10 per-timestep norms over recent logging steps (needs matplotlib).

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
    ) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.core = GuardCore(
            clip=clip,
            norm_type=norm_type,
            on_nonfinite=on_nonfinite,
            max_consecutive_skips=max_consecutive_skips,
            group_by=group_by,
            log_every_n_steps=None,
            track_timesteps=track_timesteps,
            timestep_vanish_ratio=timestep_vanish_ratio,
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
    def last_report(self) -> StepReport | None:
        """The report of the latest optimizer step."""
        return self._last_report

    _last_report: StepReport | None = None

    def summary(self) -> str:
        """The one-paragraph summary printed at the end of fit."""
        return self.core.summary()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clip=repr(self.core.clip),
            norm_type=self.core.norm_type,
            on_nonfinite=self.core.on_nonfinite,
            group_by=self.core.group_by,
        )

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED:
            raise MisconfigurationException(
                f"GradGuard does not support `{strategy}` yet: its gradients are sharded (or owned by the "
                "engine), so per-rank norms would be wrong. Use strategy='ddp', or remove GradGuard."
            )
        if trainer.gradient_clip_val and self.core.clip is not None:
            rank_zero_warn(
                f"GradGuard clips with {self.core.clip!r} and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
                "is also set: gradients would be clipped twice (GradGuard first, then Lightning). "
                "Remove one of them."
            )
        self.core.watch(pl_module)

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
        self.core.begin_step(trainer.global_step, log=self._is_logging_step(trainer))

    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        # The Trainer sets `log_every_n_steps` dynamically; 0 there means Lightning never logs.
        n = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        return n > 0 and (trainer.global_step + 1) % n == 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.core.observe_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        strategy = trainer.strategy

        def reduce(flags: Tensor) -> Tensor:
            return strategy.reduce(flags, reduce_op="sum")

        report = self.core.step(
            optimizer,
            step=step,
            log=self._is_logging_step(trainer),
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            optimizer_idx=idx,
            reduce=reduce if trainer.world_size > 1 else None,
        )
        self._last_report = report
        if report.metrics:
            for logger in trainer.loggers:
                logger.log_metrics(report.metrics, step=step)
            if report.timesteps:
                dashboard.log_timestep_images(trainer.loggers, self.core, step)
        if report.should_stop:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.core.summary())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.core.unwatch()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_report"] = None
        return state
