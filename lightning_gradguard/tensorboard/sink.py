"""The TensorBoard sink: everything the guard writes to TensorBoard beyond scalars.

Only a ``TensorBoardLogger`` gets these, on rank zero, through the writers of :mod:`.format`:

* a Custom Scalars layout, category "GradGuard", written once at fit start;
* the run's configuration, the events, the layer order and the per-timestep profiles: the data of
  ``gradguard report`` and the GradGuard tab, as structured tensor summaries;
* ``gradguard/flow`` and ``gradguard/timestep/<name>`` images at logging steps (:mod:`.render`);
* ``gradguard/hist/<layer>``: gradient histograms, with ``log_histograms=True``;
* text for people: ``gradguard/alerts`` (rate-limited alerts) and ``gradguard/nonfinite``.

It is given what it draws (the configuration, the step report with its layer order and timestep
history), never the guard itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.alerts import AlertRouter, is_rank_zero
from lightning_gradguard.core.step_report import StepReport
from lightning_gradguard.events import GradEvent
from lightning_gradguard.tensorboard import format as tbformat
from lightning_gradguard.tensorboard.render import Renderer, render_flow, render_timestep_heatmap

__all__ = ["TensorBoardSink", "find_tensorboard_writer", "log_histograms", "write_layout"]

def find_tensorboard_writer(loggers: Iterable[Any]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoardLogger in ``loggers``, or None."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def timestep_images_job(
    writer: Any, heat: Mapping[str, Sequence[tuple[int, Tensor]]], step: int
) -> Callable[[], None] | None:
    """A job drawing one heatmap per sequence tracked at ``step`` (None when there is none)."""
    jobs = [(name, list(rows)) for name, rows in heat.items() if rows and rows[-1][0] == step]
    if not jobs or not hasattr(writer, "add_image"):
        return None

    def draw() -> None:
        for name, rows in jobs:
            image = render_timestep_heatmap(name, rows)
            writer.add_image(f"{tbformat.TIMESTEP_IMAGE_PREFIX}{name}", torch.from_numpy(image), global_step=step,
                             dataformats="HWC")

    return draw


def write_layout(loggers: Iterable[Any]) -> bool:
    """Write the Custom Scalars layout once (rank zero, TensorBoardLogger only). True if written."""
    if not is_rank_zero():
        return False
    writer = find_tensorboard_writer(loggers)
    if writer is None or not hasattr(writer, "add_custom_scalars"):
        return False
    writer.add_custom_scalars(tbformat.custom_scalars_layout())
    return True


def flow_image_job(
    writer: Any, report: StepReport, layer_order: Sequence[str], vanish: float | None, explode: float | None
) -> Callable[[], None] | None:
    """A job drawing ``gradguard/flow`` for a logging step's report (None without layer norms)."""
    if not report.layer_norms or not hasattr(writer, "add_image"):
        return None
    names = [n for n in layer_order if n in report.layer_norms]
    norms = [report.layer_norms[n] for n in names]
    step = report.step

    def draw() -> None:
        image = render_flow(names, norms, step, vanish, explode)
        writer.add_image(tbformat.FLOW_TAG, torch.from_numpy(image), global_step=step, dataformats="HWC")

    return draw


def log_histograms(loggers: Iterable[Any], layers: dict[str, list[Tensor]], step: int) -> None:
    """One gradient histogram per layer (``gradguard/hist/<layer>``); each copies the layer's gradient
    to the host, so this costs a device-to-host copy of every gradient on logging steps."""
    if not is_rank_zero():
        return
    writer = find_tensorboard_writer(loggers)
    if writer is None or not hasattr(writer, "add_histogram"):
        return
    for name, grads in layers.items():
        flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in grads])
        flat = flat[torch.isfinite(flat)]
        if flat.numel():
            writer.add_histogram(f"{tbformat.HIST_PREFIX}{name}", flat, global_step=step)


class TensorBoardSink:
    """Everything the guard writes to TensorBoard beyond scalars, fed one step report at a time.

    * :meth:`attach` (at setup): routes rate-limited alerts to the text ``gradguard/alerts`` and
      every non-finite step to ``gradguard/nonfinite``, and writes the Custom Scalars layout.
    * :meth:`write` (each logging step): the raw per-timestep profiles, the layer order (whenever
      it changes), the images (the timestep heatmaps and ``gradguard/flow``, one render job) and,
      with ``log_histograms``, histograms.
    * :meth:`close` (end of training): waits for the images in flight, and writes the events
      recorded since the last logging step.
    * :meth:`finish` (end of fit, whatever the cadence): :meth:`close`, then the run's summary (its
      steps and logging cadence), so that a run shorter than ``log_every_n_steps`` still holds its
      configuration, its events and how long it ran.

    Only a ``TensorBoardLogger`` on rank zero is written to; with none, every call is a no-op.

    Args:
        log_histograms: also write per-layer gradient histograms (a device-to-host copy of every
            gradient per logging step).
        images_in_background: draw images on a background thread within a 2% time budget.
        images: draw the matplotlib images at all (False: scalars, texts and the GradGuard tab's
            data only).

    Raises:
        TypeError: an argument is not a bool.

    Example::

        >>> sink = TensorBoardSink(log_histograms=False)
        >>> sink.attach([], AlertRouter(), is_global_zero=True)   # no TensorBoardLogger: nothing to do
        False
    """

    def __init__(self, log_histograms: bool = False, images_in_background: bool = True, images: bool = True) -> None:
        for name, value in (("log_histograms", log_histograms), ("images_in_background", images_in_background),
                            ("images", images)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}.")
        self.log_histograms = log_histograms
        self.images = images
        self.renderer = Renderer(background=images_in_background)
        self._logged_order: list[str] = []
        self._events: list[tuple[GradEvent, bool]] = []  # recorded since the last write, and whether alerted
        self._config: dict[str, Any] = {}
        self._events_step = -1  # the step of the last events summary (kept strictly increasing)
        self._writer: Any = None

    def attach(
        self, loggers: Sequence[Any], router: AlertRouter, is_global_zero: bool, config: Mapping[str, Any] | None = None
    ) -> bool:
        """Route ``router``'s alerts and events to TensorBoard and write the layout, and (with ``config``:
        the options the run is guarded with) the run's configuration; True if a writer was found."""
        router.disconnect(self)  # attached again (a second fit): the previous writer is gone
        writer = find_tensorboard_writer(loggers) if is_global_zero else None
        self._writer = writer
        self._config = dict(config or {})
        if writer is None or not hasattr(writer, "add_text"):
            return False

        def alert_text(event: GradEvent, message: str) -> None:
            tbformat.write_alert_text(writer, event, message)
            if self._events and self._events[-1][0] is event:  # it passed the rate limit
                self._events[-1] = (event, True)

        def every_event(event: GradEvent) -> None:
            if event.kind == "nonfinite":
                tbformat.write_nonfinite_text(writer, event)
            self._collect(event)

        router.connect(self, alert=alert_text, tap=every_event)
        write_layout(loggers)
        if config is not None:
            tbformat.write_config(writer, config)
            # An empty list at step 0 says "this run records its events" even if it never has one.
            tbformat.write_events(writer, [], 0)
        return True

    def write(self, loggers: Sequence[Any], report: StepReport, is_global_zero: bool) -> None:
        """Write one logging step's profiles, events, layer order, images and histograms, from its report."""
        writer = find_tensorboard_writer(loggers) if is_global_zero and is_rank_zero() else None
        if writer is None:
            return
        for name, profile in report.timesteps.items():
            tbformat.write_profile(writer, name, profile.numpy(), report.step)
        self._flush_events(writer, report.step)
        order = list(report.layer_order)
        if order != self._logged_order:  # once, and whenever it changes
            self._logged_order = order
            tbformat.write_layer_order(writer, order, report.step)
        if self.images:  # all of this step's images are one job: none crowds out another
            vanish, explode = self._config.get("vanish_threshold") or None, self._config.get("explode_threshold")
            jobs = [timestep_images_job(writer, report.timestep_heat, report.step) if report.timesteps else None,
                    flow_image_job(writer, report, order, vanish, explode)]
            todo = [job for job in jobs if job is not None]

            def draw_all() -> None:
                for job in todo:
                    job()

            if todo:
                self.renderer.submit(draw_all)
        if self.log_histograms and report.layout is not None:
            layout = report.layout
            by_layer: dict[str, list[Tensor]] = {}
            for p, layer in zip(layout.params, layout.param_layer, strict=True):
                if p.grad is not None and not p.grad.is_sparse:
                    by_layer.setdefault(layout.layer_names[layer], []).append(p.grad)
            log_histograms(loggers, by_layer, report.step)

    def _collect(self, event: GradEvent) -> None:
        self._events.append((event, False))
        if len(self._events) >= 1000 and self._writer is not None:  # a run that rarely logs: bound the memory
            self._flush_events(self._writer, self._events_step + 1)

    def _flush_events(self, writer: Any, step: int) -> None:
        """Write the events recorded since the last write as one ``gradguard/events`` summary."""
        if not self._events:
            return
        events, self._events = self._events, []
        step = max(step, max(e.step for e, _ in events), self._events_step + 1)
        self._events_step = step
        tbformat.write_events(writer, events, step)

    def close(self) -> None:
        """Wait for the images in flight, so that they reach the event file before the logger closes,
        and write the events recorded since the last logging step."""
        self.renderer.close()
        if self._writer is not None:
            self._flush_events(self._writer, self._events_step + 1)

    def finish(self, steps: int, log_every_n_steps: int | None, summary: str | None = None) -> None:
        """End of fit (also when it ended in an exception): :meth:`close`, then the summary
        ``gradguard/summary`` (``steps`` optimizer steps, the cadence, the guard's one-paragraph
        ``summary``), and the writer flushed, so that
        all of it is on disk even if the process is killed before the logger closes.

        Example::

            >>> sink = TensorBoardSink()
            >>> sink.finish(40, 50)   # never attached to a TensorBoardLogger: nothing to write
        """
        self.close()
        writer = self._writer
        if writer is None:
            return
        tbformat.write_summary(writer, steps, log_every_n_steps, summary)
        flush = getattr(writer, "flush", None)
        if callable(flush):
            flush()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"], state["_events"] = None, []  # bound to a live logger
        return state
