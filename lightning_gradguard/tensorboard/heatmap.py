"""Fitting the layers × steps heatmap on one screen, on the server: steps binned to the screen's
width, layers grouped past a few dozen.

* **Steps.** Past :data:`MAX_COLUMNS` logging steps, consecutive steps are binned into that many
  columns. Each cell keeps the bin's min, median and max (the hover shows them exactly) and shows
  its *worst* value: the smallest norm (where gradients vanish), unless one exceeds the explode
  threshold (then the largest); a non-finite value marks the whole bin non-finite.
* **Layers.** Past :data:`MAX_ROWS` layers, rows are grouped: by the model's own blocks
  (``blocks.3.attn`` and ``blocks.3.mlp`` in ``blocks.3``) when that gives between 2 and
  :data:`MAX_ROWS` groups, else into equal runs of consecutive layers in forward order. A group's
  row shows the worst value over its layers; the tab expands it on click to its layers' rows.
* **Zero is a value**: an exactly-zero norm stays 0 (the tab colours it as "zero"); only a layer that
  did not log at a step is missing (None).

Example::

    >>> cols = bin_columns(list(range(10)), [[float(v) for v in range(10)]], max_columns=5)
    >>> cols["steps"], cols["norms"][0], cols["hi"][0]
    ([0, 2, 4, 6, 8], [0.0, 2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0, 9.0])
    >>> [g["name"] for g in group_rows([f"blocks.{b}.{p}" for b in range(30) for p in ("a", "m")])][:2]
    ['blocks.0', 'blocks.1']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_gradguard.health.findings import block_of

__all__ = ["MAX_COLUMNS", "MAX_ROWS", "bin_columns", "bin_matrix", "evenly", "group_rows", "worst"]

MAX_COLUMNS = 300
MAX_ROWS = 48
_BINNED_ROWS = 40  # layers per equal group: ceil(n / this)


def worst(values: Sequence[float | None], explode: float | None = None) -> float | None:
    """The worst of a cell's values: non-finite first, then the largest when above ``explode``,
    else the smallest (0 included); None when nothing was logged."""
    logged = [v for v in values if v is not None]
    if not logged:
        return None
    bad = [v for v in logged if not math.isfinite(v)]
    if bad:
        return bad[0]
    top = max(logged)
    return top if explode is not None and top > explode else min(logged)


def bin_columns(
    steps: Sequence[int], rows: Sequence[Sequence[float | None]], explode: float | None = None,
    max_columns: int = MAX_COLUMNS,
) -> dict[str, Any]:  # fmt: skip
    """Steps binned into at most ``max_columns`` columns: each column's first step, its [first, last]
    steps, and per row the worst value (``norms``) with the bin's min, median and max (None: nothing
    finite logged there). Rows hold None where a layer did not log."""
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    missing = np.array([[v is None for v in row] for row in rows], dtype=bool)
    return bin_matrix(np.asarray(steps), values.reshape(len(rows), len(steps)),
                      missing.reshape(len(rows), len(steps)), explode, max_columns)  # fmt: skip


def bin_matrix(steps: Any, values: Any, missing: Any, explode: float | None = None,
               max_columns: int = MAX_COLUMNS) -> dict[str, Any]:  # fmt: skip
    """:func:`bin_columns` on numpy arrays: ``values`` (rows x steps; anything where ``missing``)."""
    import numpy as np

    n = len(steps)
    size = max(1, math.ceil(n / max_columns))
    firsts = np.arange(0, n, size)
    lasts = np.minimum(firsts + size, n) - 1
    out: dict[str, Any] = {"steps": steps[firsts].tolist(), "bins": np.stack([steps[firsts], steps[lasts]], 1).tolist()}
    rows = values.shape[0]
    if size == 1:
        out["norms"] = _listed(np.where(missing, np.nan, values), missing)
        return out
    pad = len(firsts) * size - n
    fill = np.full((rows, pad), np.nan)
    vals = np.concatenate([values, fill], 1).reshape(rows, len(firsts), size)
    gone = np.concatenate([missing, np.ones((rows, pad), bool)], 1).reshape(rows, len(firsts), size)
    finite = np.isfinite(vals) & ~gone
    clean = np.where(finite, vals, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin is None, by design
        lo, mid, hi = np.nanmin(clean, 2), np.nanmedian(clean, 2), np.nanmax(clean, 2)
    bad = (~finite & ~gone).any(2)
    first_bad = np.take_along_axis(vals, np.argmax(~finite & ~gone, 2)[..., None], 2)[..., 0]
    weakest = lo if explode is None else np.where(hi > explode, hi, lo)
    shown = np.where(bad, first_bad, weakest)
    empty = gone.all(2)
    out["norms"] = _listed(shown, empty)
    for key, arr in (("lo", lo), ("mid", mid), ("hi", hi)):
        out[key] = _listed(arr, ~finite.any(2))
    return out


def _listed(arr: Any, none: Any) -> list[list[float | None]]:
    """Rows of floats, None where ``none`` (non-finite values stay: JSON turns them into null)."""
    rows = arr.tolist()
    for r, k in zip(*none.nonzero(), strict=True):
        rows[r][k] = None
    return rows  # type: ignore[no-any-return]


def group_rows(names: Sequence[str], max_rows: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Groups of consecutive layers (forward order) when there are more than ``max_rows``; [] otherwise.
    Each group: ``name`` and ``members`` (the layers' indices)."""
    if len(names) <= max_rows:
        return []
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        blocks.setdefault(block_of(name), []).append(i)
    if 2 <= len(blocks) <= max_rows:
        return [{"name": block, "members": members} for block, members in blocks.items()]
    size = math.ceil(len(names) / _BINNED_ROWS)
    groups = []
    for start in range(0, len(names), size):
        members = list(range(start, min(len(names), start + size)))
        groups.append({"name": f"{names[members[0]]} … {names[members[-1]]}", "members": members})
    return groups


def evenly(n: int, most: int = MAX_COLUMNS) -> list[int]:
    """At most ``most`` indices of ``range(n)``, evenly spaced, the first and the last included (the
    per-timestep heatmap keeps that many logging steps).

    Example::

        >>> evenly(10, 4), evenly(3, 4)
        ([0, 3, 6, 9], [0, 1, 2])
    """
    if n <= most:
        return list(range(n))
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})
