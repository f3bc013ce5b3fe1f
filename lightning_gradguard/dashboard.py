"""TensorBoard output beyond scalars: the per-timestep heatmap images.

Only a ``TensorBoardLogger`` gets images, on rank zero, on logging steps. Rendering uses matplotlib
(the optional extra ``lightning-gradguard[plot]``), imported lazily on the first logging step that
needs it; without it, a one-time warning says what is missing and training goes on.

Cost: one small figure per tracked sequence per logging step (a few milliseconds each on a CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.alerts import GradGuardWarning, is_rank_zero

__all__ = ["find_tensorboard_writer", "log_timestep_images", "render_timestep_heatmap"]

_warned: set[str] = set()


def find_tensorboard_writer(loggers: Iterable[Any]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoardLogger in ``loggers``, or None."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            return logger.experiment
    return None


def render_timestep_heatmap(name: str, rows: Sequence[tuple[int, Tensor]]) -> Any:
    """Render a heatmap (x: timestep, y: logging step, colour: log10 norm) with the latest profile.

    Returns an HWC uint8 numpy array. Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(int(p.numel()) for _, p in rows)
    grid = np.full((len(rows), width), np.nan)
    for r, (_, profile) in enumerate(rows):
        v = profile.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            grid[r, : v.size] = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
    fig, (ax, line) = plt.subplots(2, 1, figsize=(7, 5), height_ratios=[3, 1.4], dpi=80)
    mesh = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(s) for s, _ in rows], fontsize=6)
    ax.set_ylabel("optimizer step")
    ax.set_title(f"log10 ‖∂L/∂x_t‖ — {name}", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="log10 norm")
    last = rows[-1][1].double().numpy()
    line.semilogy(np.arange(last.size), np.where(last > 0, last, np.nan))
    line.set_xlabel("timestep t")
    line.set_ylabel("latest")
    line.set_xlim(ax.get_xlim())
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig)
    return image


def log_timestep_images(loggers: Iterable[Any], core: Any, step: int) -> None:
    """Write one heatmap image per tracked sequence to TensorBoard (rank zero, if present)."""
    if not is_rank_zero():
        return
    writer = find_tensorboard_writer(loggers)
    if writer is None or not hasattr(writer, "add_image"):
        return
    for name, rows in core.timestep_heat.items():
        if not rows or rows[-1][0] != step:
            continue
        try:
            image = render_timestep_heatmap(name, list(rows))
        except ImportError:
            if "mpl" not in _warned:
                _warned.add("mpl")
                warnings.warn(
                    "GradGuard: matplotlib is not installed, so no per-timestep heatmap images are written "
                    "(scalars still are). `pip install lightning-gradguard[plot]` adds it.",
                    GradGuardWarning,
                    stacklevel=2,
                )
            return
        writer.add_image(f"gradguard/timestep/{name}", torch.from_numpy(image), global_step=step, dataformats="HWC")
