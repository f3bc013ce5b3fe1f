"""A dump of a bad step, so that it can be reproduced: write it atomically, read it back safely.

A dump is one ``torch.save`` file holding only tensors, numbers, strings and containers, so that
:func:`load_dump` reads it with ``torch.load(..., weights_only=True)``: loading a dump never runs
code from the file. It holds:

* ``batch``: the batch (or, under gradient accumulation, the list of micro-batches) of the step;
  anything that is not a tensor, number, string or container of them is replaced by its ``repr``;
* ``batch_idx``, ``global_step``, ``epoch``;
* ``rng``: the RNG states as they were *before the step's forward pass* (torch CPU, CUDA where
  present, numpy and Python's ``random``), so that dropout draws the same masks on replay;
* ``model`` and ``optimizer``: their ``state_dict`` as they were *before the step*;
* ``event``: the event, as a dict.

Replay a dump (see the README for the whole recipe)::

    dump = load_dump("dumps/gradguard-step000123-nonfinite.pt")
    model.load_state_dict(dump["model"])
    restore_rng(dump["rng"])
    loss = model.training_step(dump["batch"], dump["batch_idx"])
    loss.backward()                    # the same non-finite gradient, at the same layer
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._validate import check_int
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.events import GradEvent

__all__ = ["DUMP_FORMAT", "Dumper", "capture_rng", "load_dump", "restore_rng", "to_safe", "write_dump"]

DUMP_FORMAT = "lightning_gradguard.dump/1"


def to_safe(obj: Any) -> Any:
    """``obj`` with tensors detached to CPU and anything ``weights_only`` cannot load turned into its repr.

    Example::

        >>> import torch
        >>> to_safe({"x": torch.ones(2), "meta": object})["meta"]
        "<class 'object'>"
    """
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_safe(v) for v in obj]
        return items if isinstance(obj, list) or type(obj) is not tuple else tuple(items)
    try:  # numpy arrays and scalars
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    return repr(obj)


def capture_rng() -> dict[str, Any]:
    """The current RNG states (torch CPU, CUDA where initialised, numpy, Python), as safe values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys).astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    except ImportError:  # pragma: no cover
        pass
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss": gauss}
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured.

    Example::

        >>> import torch
        >>> s = capture_rng(); a = torch.rand(1); restore_rng(s); b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def write_dump(
    directory: str | os.PathLike[str],
    *,
    event: GradEvent,
    batch: Any,
    batch_idx: int,
    global_step: int,
    epoch: int,
    rng: dict[str, Any],
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    rank: int | None = None,
    micro_batches: int = 1,
) -> Path:
    """Write one dump atomically (a temporary file in the same directory, then a rename).

    Returns:
        The path written: ``<directory>/gradguard-step<global_step>-<kind>[-rank<r>].pt``.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = f"-rank{rank}" if rank is not None else ""
    path = folder / f"gradguard-step{global_step:06d}-{event.kind}{suffix}.pt"
    payload = {
        "format": DUMP_FORMAT,
        "event": to_safe(event.as_dict()),
        "batch": to_safe(batch),
        "batch_idx": int(batch_idx),
        "micro_batches": int(micro_batches),
        "global_step": int(global_step),
        "epoch": int(epoch),
        "rng": to_safe(rng),
        "model": to_safe(model_state),
        "optimizer": to_safe(optimizer_state),
        "torch_version": str(torch.__version__),
    }
    fd, tmp = tempfile.mkstemp(prefix=".gradguard-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_dump(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a dump written by the guard, with ``torch.load(..., weights_only=True)``.

    Args:
        path: the dump file.

    Raises:
        GradGuardError: the file does not exist, cannot be read as a weights-only torch file (a
            pickle of arbitrary objects is refused, never executed), or is not a GradGuard dump.

    Example::

        >>> import tempfile, torch
        >>> from lightning_gradguard.events import GradEvent
        >>> d = tempfile.mkdtemp()
        >>> p = write_dump(d, event=GradEvent("spike", step=3), batch=torch.ones(2), batch_idx=3,
        ...                global_step=3, epoch=0, rng=capture_rng(), model_state={}, optimizer_state={})
        >>> load_dump(p)["event"]["kind"]
        'spike'
    """
    file = Path(path)
    if not file.is_file():
        raise GradGuardError(f"GradGuard: no dump at {str(file)!r}.")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GradGuardError(
            f"GradGuard: {str(file)!r} is not a GradGuard dump: it cannot be read as a weights-only torch file "
            f"(refusing to unpickle arbitrary objects): {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        raise GradGuardError(
            f"GradGuard: {str(file)!r} is a torch file but not a GradGuard dump (expected format "
            f"{DUMP_FORMAT!r}, got {data.get('format') if isinstance(data, dict) else type(data).__name__!r})."
        )
    return data


class Dumper:
    """Keeps what a dump of the current step needs, and dumps the first bad steps.

    The first non-finite or spike step is dumped, and then the first of each new (kind, origin), up
    to ``max_dumps`` files. While dumps remain, each step's batches and the RNG state from before its
    first forward pass are kept (by reference: no copy until a dump is written).

    Args:
        dump_dir: the directory for dumps, or None (no dumps).
        max_dumps: at most this many files, an int >= 1.

    Raises:
        TypeError: ``dump_dir`` is not a path or None.
        ValueError: ``max_dumps`` is not an int >= 1.

    Example::

        >>> Dumper(None, 5).active, Dumper("dumps", 5).active
        (False, True)
    """

    def __init__(self, dump_dir: str | os.PathLike[str] | None, max_dumps: int = 5) -> None:
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise TypeError(f"Expected `dump_dir` to be a directory path or None, but got {dump_dir!r}.")
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)
        self.max_dumps = int(check_int("max_dumps", max_dumps, minimum=1))  # type: ignore[arg-type]
        self.paths: list[str] = []
        self.origins: set[str] = set()
        self._batches: list[Any] = []
        self._batch_idx = 0
        self._rng: dict[str, Any] | None = None
        self._open = False  # within an optimizer step (between its first micro-batch and the step)

    @property
    def active(self) -> bool:
        """Whether dumps are on and some remain."""
        return self.dump_dir is not None and len(self.paths) < self.max_dumps

    def begin_batch(self, batch: Any, batch_idx: int) -> None:
        """A (micro-)batch starts: keep it, and the RNG state on the first of an optimizer step."""
        if self.active:
            if not self._open:
                self._batches, self._rng = [], capture_rng()
            self._batches.append(batch)
            self._batch_idx = batch_idx
        self._open = True

    def end_step(self) -> None:
        """The optimizer step is being taken: the next batch begins a new one."""
        self._open = False

    def maybe_dump(
        self,
        event: GradEvent | None,
        *,
        global_step: int,
        epoch: int,
        model_state: Callable[[], dict[str, Any]],
        optimizer_state: Callable[[], dict[str, Any]],
        rank: int | None = None,
    ) -> Path | None:
        """Dump the step of ``event`` if it is the first of its kind and origin; the path, or None."""
        if self.dump_dir is None or event is None or event.kind not in ("nonfinite", "spike"):
            return None
        if len(self.paths) >= self.max_dumps or self._rng is None:
            return None
        origin = f"{event.kind}:{event.origin}"
        if origin in self.origins:
            return None
        self.origins.add(origin)
        path = write_dump(
            self.dump_dir,
            event=event,
            batch=self._batches[0] if len(self._batches) == 1 else list(self._batches),
            batch_idx=self._batch_idx,
            global_step=global_step,
            epoch=epoch,
            rng=self._rng,
            model_state=model_state(),
            optimizer_state=optimizer_state(),
            rank=rank,
            micro_batches=len(self._batches),
        )
        self.paths.append(str(path))
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"dumps": list(self.paths), "dumped_origins": sorted(self.origins)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.paths = [str(p) for p in state.get("dumps", [])]
        self.origins = set(state.get("dumped_origins", []))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_batches"], state["_rng"] = [], None  # live batches and RNG state: not part of a pickle
        return state
