"""The matplotlib images: the gradient-flow chart and the per-timestep heatmaps, drawn off the
training thread within a time budget (:class:`Renderer`).

Rendering uses matplotlib (the optional extra ``lightning-gradguard[plot]``), imported lazily on
the first logging step that needs it; without it, a one-time warning says what is missing and
training goes on. Cost: one small figure per image per logging step (``benchmarks/`` measures it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from lightning_gradguard.core.alerts import warn

__all__ = ["Renderer", "render_flow", "render_timestep_heatmap"]

_warned: set[str] = set()


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
                warn(f"GradGuard: drawing an image failed ({exc!r}); scalars are unaffected.")
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


def _warn_no_matplotlib() -> None:
    if "mpl" not in _warned:
        _warned.add("mpl")
        warn(
            "GradGuard: matplotlib is not installed, so no images are written to TensorBoard "
            "(scalars still are). `pip install lightning-gradguard[plot]` adds it."
        )
