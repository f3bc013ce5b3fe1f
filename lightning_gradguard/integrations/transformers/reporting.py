"""Where the guard's metrics, events and TensorBoard extras go under Hugging Face's Trainer.

* **TensorBoard** (``report_to`` includes ``"tensorboard"``): the guard writes with a writer of its
  own into the Trainer's TensorBoard directory, the one its ``TensorBoardCallback`` chose
  (``TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/<date>_<host>``): the scalars under
  ``gradguard/...`` at the guard's steps, and everything :class:`~lightning_gradguard.tensorboard.sink.TensorBoardSink`
  writes (the run's configuration, the events, the layer order, images), so that the GradGuard tab
  and ``gradguard report`` read a Hugging Face run as they read a Lightning one. (The Trainer's own
  callback prefixes every key with ``train/``, and closes its writer before the guard's last events
  are written: hence a writer of the guard's own, in the same run directory.)
* **The Trainer's other reporters** (W&B, MLflow, Comet, ...): at each of the Trainer's logs, the
  guard's metrics since the previous one are handed to each of them through its own ``on_log``, as
  the Trainer hands them its loss.
* **W&B alerts**: with ``report_to`` including ``"wandb"``, alarms also go to ``wandb.alert``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradguard.core.alerts import AlertRouter
from lightning_gradguard.notify.wandb import WandbAlert

__all__ = ["TensorBoardLogger", "connect_wandb", "open_tensorboard", "reporters"]


class TensorBoardLogger:
    """The guard's writer in the Trainer's TensorBoard directory, shaped as the sink looks for a
    logger (a ``TensorBoardLogger`` with an ``experiment``): ``log_metrics`` writes ``gradguard/...``
    scalars as they are named, never prefixed."""

    def __init__(self, writer: Any, log_dir: str) -> None:
        self.experiment = writer
        self.log_dir = log_dir

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.experiment.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.experiment.flush()
        self.experiment.close()


def _tensorboard_callback(handler: Any) -> Any | None:
    from transformers.integrations.integration_utils import TensorBoardCallback

    return next((cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, TensorBoardCallback)), None)


def open_tensorboard(handler: Any, is_world_zero: bool) -> TensorBoardLogger | None:
    """A writer in the directory of the Trainer's ``TensorBoardCallback`` (rank zero, ``report_to``
    with ``"tensorboard"``; its ``on_train_begin``, which chooses the directory, has run), or None."""
    callback = _tensorboard_callback(handler)
    log_dir = getattr(callback, "logging_dir", None)
    if callback is None or not is_world_zero or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return TensorBoardLogger(SummaryWriter(log_dir=log_dir), log_dir)


def reporters(handler: Any) -> list[Any]:
    """The Trainer's reporting callbacks (``report_to``) other than TensorBoard's, which the guard
    writes itself."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, TensorBoardCallback

    kinds = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if c is not TensorBoardCallback)
    return [cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, kinds)]


def forward_metrics(to: Sequence[Any], metrics: dict[str, float], args: Any, state: Any, control: Any) -> None:
    """Hand the guard's metrics to each reporter, through its own ``on_log``."""
    if not metrics:
        return
    for reporter in to:
        reporter.on_log(args, state, control, logs=dict(metrics))


def connect_wandb(
    handler: Any, alerts: AlertRouter, previous: WandbAlert | None, is_world_zero: bool
) -> WandbAlert | None:
    """With the Trainer's ``WandbCallback`` and a live W&B run, alarms also go to ``wandb.alert``
    (rate-limited like the others), on rank zero; the notifier of an earlier run is replaced."""
    if previous in alerts.notifiers:
        alerts.notifiers.remove(previous)
    from transformers.integrations.integration_utils import WandbCallback

    found = next((cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, WandbCallback)), None)
    run = getattr(getattr(found, "_wandb", None), "run", None)
    if found is None or run is None or not is_world_zero:
        return None
    connected = WandbAlert(run)
    alerts.notifiers.append(connected)
    return connected
