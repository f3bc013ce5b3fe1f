"""TensorBoard output beyond scalars: one page that answers "are my gradients healthy, and where not?".

Only a ``TensorBoardLogger`` gets these, on rank zero:

* a Custom Scalars layout, category "GradGuard", written once at fit start;
* ``gradguard/flow``: a gradient-flow image at logging steps (layers in forward order, log norm,
  thresholds as lines);
* ``gradguard/timestep/<name>``: a per-timestep heatmap per tracked sequence;
* ``gradguard/hist/<layer>``: gradient histograms, with ``log_histograms=True``;
* text: ``gradguard/alerts`` (rate-limited alerts), ``gradguard/nonfinite`` (every non-finite step,
  its origin and layers) and ``gradguard/layer_order``;
* the data of the GradGuard tab (:mod:`~lightning_gradguard.tabdata`): the thresholds, the raw
  per-timestep profiles and every event, as tensor summaries under the plugin name ``gradguard``.

Rendering uses matplotlib (the optional extra ``lightning-gradguard[plot]``), imported lazily on
the first logging step that needs it; without it, a one-time warning says what is missing and
training goes on. Cost: one small figure per image per logging step (``benchmarks/`` measures it).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard import tabdata
from lightning_gradguard.alerts import AlertRouter, GradGuardWarning, is_rank_zero
from lightning_gradguard.events import GradEvent

__all__ = [
    "Renderer",
    "TensorBoardSink",
    "custom_scalars_layout",
    "find_tensorboard_writer",
    "log_histograms",
    "render_flow",
    "render_timestep_heatmap",
    "write_layout",
]

_warned: set[str] = set()


def find_tensorboard_writer(loggers: Iterable[Any]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoardLogger in ``loggers``, or None."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot (thread-safe, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=72)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig: Any) -> Any:
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def render_timestep_heatmap(name: str, rows: Sequence[tuple[int, Tensor]]) -> Any:
    """Render a heatmap (x: timestep, y: logging step, colour: log10 norm) with the latest profile.

    Returns an HWC uint8 numpy array. Raises ImportError when matplotlib is missing.
    """
    import numpy as np

    width = max(int(p.numel()) for _, p in rows)
    grid = np.full((len(rows), width), np.nan)
    for r, (_, profile) in enumerate(rows):
        v = profile.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            grid[r, : v.size] = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
    fig = _figure(7, 5)
    ax = fig.add_axes((0.11, 0.38, 0.72, 0.55))
    cax = fig.add_axes((0.86, 0.38, 0.025, 0.55))
    line = fig.add_axes((0.11, 0.08, 0.72, 0.2))
    mesh = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ticks = list(range(0, len(rows), max(1, len(rows) // 8)))
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(rows[i][0]) for i in ticks], fontsize=7)
    ax.set_ylabel("optimizer step")
    ax.set_title(f"log10 ‖∂L/∂x_t‖ — {name}", fontsize=9)
    fig.colorbar(mesh, cax=cax, label="log10 norm")
    last = rows[-1][1].double().numpy()
    line.semilogy(np.arange(last.size), np.where(last > 0, last, np.nan))
    line.set_xlabel("timestep t")
    line.set_ylabel("latest")
    line.set_xlim(ax.get_xlim())
    return _pixels(fig)


class Renderer:
    """Renders images on one background thread, within a time budget, so that training does not wait.

    * Each logging step's images are one job (the heatmaps and the flow image together), so that no
      image of a step crowds out another.
    * At most one job is in flight: a logging step that arrives while the previous one is still
      being drawn skips its images rather than queueing up work.
    * Drawing takes at most ``budget`` (default 2%) of wall time: after a batch that took d seconds,
      the next is drawn no sooner than d / budget seconds later. Skipped batches are counted in
      :attr:`skipped`; scalars are never skipped.
    * :meth:`close` waits for the job in flight, then draws the last skipped one: the run's final
      logging step is always drawn.

    ``background=False`` draws every batch inline, with no budget (tests, debugging).
    """

    def __init__(self, background: bool = True, budget: float = 0.02) -> None:
        self.background = background
        self.budget = budget
        self.skipped = 0
        self.rendered = 0
        self._pool: Any = None
        self._future: Any = None
        self._next_ok = 0.0
        self._last_skipped: Callable[[], None] | None = None

    def submit(self, job: Callable[[], None]) -> bool:
        """Draw ``job`` (inline, or on the background thread); False when the budget skipped it.

        A skipped job is kept until the next one is accepted, so that :meth:`close` can draw the
        last one: the final logging step of a run always reaches the event file.
        """
        try:
            import matplotlib  # noqa: F401  (fail here, on the caller's thread, with one warning)
        except ImportError:
            _warn_no_matplotlib()
            return False
        if not self.background:
            job()
            self.rendered += 1
            return True
        if (self._future is not None and not self._future.done()) or time.monotonic() < self._next_ok:
            self.skipped += 1
            self._last_skipped = job
            return False
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradguard-images")
        self._last_skipped = None
        self._future = self._pool.submit(self._run, job)
        return True

    def _run(self, job: Callable[[], None]) -> None:
        start = time.monotonic()
        try:
            job()
            self.rendered += 1
        except Exception as exc:  # an image must never take training down
            if "render" not in _warned:
                _warned.add("render")
                warnings.warn(f"GradGuard: drawing an image failed ({exc!r}); scalars are unaffected.",
                              GradGuardWarning, stacklevel=2)
        finally:
            end = time.monotonic()
            self._next_ok = end + (end - start) / self.budget

    def close(self) -> None:
        """Wait for the job in flight, then draw the last skipped job, if the run ended on one."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._last_skipped is not None:
            job, self._last_skipped = self._last_skipped, None
            self._run(job)
            self.skipped -= 1
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {"background": self.background, "budget": self.budget, "skipped": self.skipped,
                "rendered": self.rendered, "_pool": None, "_future": None, "_next_ok": 0.0, "_last_skipped": None}


def timestep_images_job(writer: Any, core: Any, step: int) -> Callable[[], None] | None:
    """A job drawing one heatmap per sequence tracked at ``step`` (None when there is none)."""
    jobs = [(name, list(rows)) for name, rows in core.timestep_heat.items() if rows and rows[-1][0] == step]
    if not jobs or not hasattr(writer, "add_image"):
        return None

    def draw() -> None:
        for name, rows in jobs:
            image = render_timestep_heatmap(name, rows)
            writer.add_image(f"gradguard/timestep/{name}", torch.from_numpy(image), global_step=step,
                             dataformats="HWC")

    return draw


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The "GradGuard" Custom Scalars category (tags are regular expressions)."""
    return {
        "GradGuard": {
            "total norm (before / after clipping, threshold)": [
                "Multiline",
                [r"gradguard/total_norm$", r"gradguard/total_norm_clipped$", r"gradguard/clip_threshold$"],
            ],
            "per-layer norms": ["Multiline", [r"gradguard/layer/.*"]],
            "per-timestep: log10 first/last ratio": ["Multiline", [r"gradguard/timestep/.*/log10_first_last"]],
            "per-timestep: horizon": ["Multiline", [r"gradguard/timestep/.*/horizon"]],
            "per-timestep: decay per step": ["Multiline", [r"gradguard/timestep/.*/decay_per_step"]],
            "events": [
                "Multiline",
                [r"gradguard/skipped_steps$", r"gradguard/nonfinite_steps$", r"gradguard/clipped_fraction$"],
            ],
        }
    }


def write_layout(loggers: Iterable[Any]) -> bool:
    """Write the Custom Scalars layout once (rank zero, TensorBoardLogger only). True if written."""
    if not is_rank_zero():
        return False
    writer = find_tensorboard_writer(loggers)
    if writer is None or not hasattr(writer, "add_custom_scalars"):
        return False
    writer.add_custom_scalars(custom_scalars_layout())
    return True


def render_flow(
    names: Sequence[str],
    norms: Sequence[float],
    step: int,
    vanish: float | None = None,
    explode: float | None = None,
    title: str = "gradient flow",
) -> Any:
    """A gradient-flow chart: layers in forward order on x, norm on a log y-axis, thresholds as lines.

    Returns an HWC uint8 numpy array. Raises ImportError when matplotlib is missing.
    """
    import numpy as np

    values = np.array([v if v > 0 and np.isfinite(v) else np.nan for v in norms], dtype=float)
    fig = _figure(max(5.0, 0.3 * len(names) + 2), 3.6)
    ax = fig.add_axes((0.1, 0.32, 0.87, 0.6))
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(values, nan=0.0), color="#4c72b0", width=0.7)
    for i, v in enumerate(norms):
        if not np.isfinite(v):
            ax.axvspan(i - 0.4, i + 0.4, color="#d62728", alpha=0.4)
    if vanish:
        ax.axhline(vanish, color="#8172b2", linestyle="--", linewidth=1, label=f"vanishing < {vanish:g}")
    if explode:
        ax.axhline(explode, color="#c44e52", linestyle="--", linewidth=1, label=f"exploding > {explode:g}")
    if np.any(np.isfinite(values)):  # a log axis needs a positive bar (a step with all NaN stays linear)
        ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖∂L/∂W‖ (log)")
    ax.set_title(f"{title}, step {step}", fontsize=9)
    if vanish or explode:
        ax.legend(fontsize=7, loc="best")
    return _pixels(fig)


def flow_image_job(writer: Any, core: Any, report: Any, layer_order: Sequence[str]) -> Callable[[], None] | None:
    """A job drawing ``gradguard/flow`` for a logging step's report (None without layer norms)."""
    if not report.layer_norms or not hasattr(writer, "add_image"):
        return None
    names = [n for n in layer_order if n in report.layer_norms]
    norms = [report.layer_norms[n] for n in names]
    step, vanish, explode = report.step, core.vanish_threshold or None, core.explode_threshold

    def draw() -> None:
        image = render_flow(names, norms, step, vanish, explode)
        writer.add_image("gradguard/flow", torch.from_numpy(image), global_step=step, dataformats="HWC")

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
            writer.add_histogram(f"gradguard/hist/{name}", flat, global_step=step)


def _warn_no_matplotlib() -> None:
    if "mpl" not in _warned:
        _warned.add("mpl")
        warnings.warn(
            "GradGuard: matplotlib is not installed, so no images are written to TensorBoard "
            "(scalars still are). `pip install lightning-gradguard[plot]` adds it.",
            GradGuardWarning,
            stacklevel=3,
        )


class TensorBoardSink:
    """Everything the guard writes to TensorBoard beyond scalars, fed one step report at a time.

    * :meth:`attach` (at setup): routes rate-limited alerts to the text ``gradguard/alerts`` and
      every non-finite step to ``gradguard/nonfinite``, and writes the Custom Scalars layout.
    * :meth:`write` (each logging step): the raw per-timestep profiles, the layer order (whenever
      it changes), the images (the timestep heatmaps and ``gradguard/flow``, one render job) and,
      with ``log_histograms``, histograms.
    * :meth:`close` (end of training): waits for the images in flight.

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
        self._events: list[GradEvent] = []  # recorded since the last write, for the tab
        self._events_step = -1  # the step of the last events summary (kept strictly increasing)
        self._writer: Any = None

    def attach(self, loggers: Sequence[Any], router: AlertRouter, is_global_zero: bool, core: Any = None) -> bool:
        """Route ``router``'s alerts to TensorBoard text and write the layout, and (with ``core``) the
        tab's thresholds; True if a writer was found."""
        router.sinks = []
        router.taps = []
        writer = find_tensorboard_writer(loggers) if is_global_zero else None
        self._writer = writer
        if writer is None or not hasattr(writer, "add_text"):
            return False

        def to_tensorboard(event: GradEvent, message: str) -> None:
            writer.add_text("gradguard/alerts", f"**{event.kind}** (step {event.step}): {message}", event.step)

        def nonfinite_record(event: GradEvent) -> None:  # every one, for `gradguard report`
            if event.kind == "nonfinite":
                layers = ",".join(event.layers)
                line = f"step {event.step} origin {event.origin} action {event.action} layers {layers}"
                writer.add_text("gradguard/nonfinite", line, event.step)

        router.sinks.append(to_tensorboard)
        router.taps += [nonfinite_record, self._collect]
        write_layout(loggers)
        if core is not None:
            config = {
                "vanish_threshold": core.vanish_threshold,
                "explode_threshold": core.explode_threshold,
                "timestep_vanish_ratio": core.timestep_vanish_ratio,
                "spike_zscore": core.spike_zscore,
                "norm_type": core.norm_type,
            }
            tabdata.write_json(writer, tabdata.CONFIG_TAG, config, 0)
        return True

    def write(self, loggers: Sequence[Any], core: Any, report: Any, layout: Any, is_global_zero: bool) -> None:
        """Write one logging step's images, texts and histograms (``layout``: the optimizer's layers)."""
        writer = find_tensorboard_writer(loggers) if is_global_zero and is_rank_zero() else None
        if writer is None:
            return
        for name, profile in report.timesteps.items():
            tabdata.write_vector(writer, f"{tabdata.PROFILE_PREFIX}{name}", profile.numpy(), report.step)
        self._flush_events(writer, report.step)
        order = core.layers.forward_names(layout)
        if order != self._logged_order:  # once, and whenever it changes: for `gradguard report`
            self._logged_order = order
            if hasattr(writer, "add_text"):
                writer.add_text("gradguard/layer_order", json.dumps(order), report.step)
        if self.images:  # all of this step's images are one job: none crowds out another
            jobs = [timestep_images_job(writer, core, report.step) if report.timesteps else None,
                    flow_image_job(writer, core, report, order)]
            todo = [job for job in jobs if job is not None]

            def draw_all() -> None:
                for job in todo:
                    job()

            if todo:
                self.renderer.submit(draw_all)
        if self.log_histograms:
            by_layer: dict[str, list[Tensor]] = {}
            for p, layer in zip(layout.params, layout.param_layer, strict=True):
                if p.grad is not None and not p.grad.is_sparse:
                    by_layer.setdefault(layout.layer_names[layer], []).append(p.grad)
            log_histograms(loggers, by_layer, report.step)

    def _collect(self, event: GradEvent) -> None:
        self._events.append(event)
        if len(self._events) >= 1000 and self._writer is not None:  # a run that rarely logs: bound the memory
            self._flush_events(self._writer, self._events_step + 1)

    def _flush_events(self, writer: Any, step: int) -> None:
        """Write the events recorded since the last write as one ``gradguard/events`` summary."""
        if not self._events:
            return
        events, self._events = self._events, []
        step = max(step, max(e.step for e in events), self._events_step + 1)
        self._events_step = step
        rows = [{k: v for k, v in e.as_dict().items() if k != "extra"} for e in events]
        tabdata.write_json(writer, tabdata.EVENTS_TAG, rows, step)

    def close(self) -> None:
        """Wait for the images in flight, so that they reach the event file before the logger closes,
        and write the events recorded since the last logging step."""
        self.renderer.close()
        if self._writer is not None:
            self._flush_events(self._writer, self._events_step + 1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"], state["_events"] = None, []  # bound to a live logger
        return state
