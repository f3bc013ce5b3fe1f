"""The one host read of a step, by name.

Every stage of a step leaves its results on the device. What the host must know (the flags the skip
decision needs, the total norm, the per-layer norms of a logging step, the per-timestep profiles) is
registered with one :class:`HostRead` under a name, and comes back as floats under that name after
a single ``.tolist()``: one device-to-host copy, one sync, whatever the number of values. Stages
never agree on positions in a list, only on names.

Steps whose read is deferred (``on_nonfinite="warn"``: nothing on the host depends on a
non-logging step) keep their unread :class:`HostRead` and are read together with the next one by
:meth:`HostRead.read_all`, still in one copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["HostRead"]


class HostRead:
    """Device tensors registered by name, read on the host together.

    Example::

        >>> import torch
        >>> read = HostRead()
        >>> read.put_each(("grad_bad", "loss_bad"), torch.tensor([0.0, 1.0]))
        >>> read.put("per_layer", torch.tensor([3.0, 4.0]))
        >>> read.read()          # the one .tolist()
        >>> read["loss_bad"], read.vector("per_layer")
        (1.0, [3.0, 4.0])
    """

    __slots__ = ("_dtype", "_parts", "_scalars", "_size", "_slots", "_values")

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self._dtype = dtype  # what the values are read as
        self._parts: list[Tensor] = []
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (offset, length) in the read
        self._scalars: dict[str, int] = {}  # one-value names -> offset (the hot path's lookups)
        self._size = 0
        self._values: list[float] | None = None

    def put(self, name: str, tensor: Tensor) -> None:
        """Register ``tensor`` (any shape; read flattened) under ``name``."""
        flat = tensor.reshape(-1)
        self._claim(name, flat.numel())
        self._parts.append(flat)

    def put_each(self, names: Sequence[str], tensor: Tensor) -> None:
        """Register the elements of the 1-D ``tensor``, one name each (one part, no split on the device)."""
        if tensor.shape[0] != len(names):
            raise ValueError(f"Expected {len(names)} values for {list(names)}, but got {tuple(tensor.shape)}.")
        scalars, start = self._scalars, self._size
        for k, name in enumerate(names):
            if name in scalars or name in self._slots:
                raise KeyError(f"HostRead: {name!r} is registered twice.")
            scalars[name] = start + k
        self._size = start + len(names)
        self._parts.append(tensor)

    def _claim(self, name: str, length: int) -> None:
        if name in self._slots or name in self._scalars:
            raise KeyError(f"HostRead: {name!r} is registered twice.")
        self._slots[name] = (self._size, length)
        self._size += length

    def __contains__(self, name: object) -> bool:
        return name in self._slots or name in self._scalars

    @property
    def done(self) -> bool:
        """Whether the values are on the host."""
        return self._values is not None

    def read(self) -> None:
        """Copy every registered value to the host: one sync."""
        HostRead.read_all([self])

    @staticmethod
    def read_all(reads: Iterable[HostRead]) -> None:
        """Read several :class:`HostRead` objects with one ``.tolist()`` (one sync for all of them)."""
        pending = [r for r in reads if r._values is None]
        parts = [p for r in pending for p in r._parts]
        if not parts:
            for r in pending:
                r._values = []
            return
        device, dtype = parts[0].device, pending[0]._dtype
        flat = parts[0].to(device, dtype) if len(parts) == 1 else torch.cat([p.to(device, dtype) for p in parts])
        values = flat.tolist()
        start = 0
        for r in pending:
            r._values = values[start : start + r._size]
            r._parts = []  # the device tensors are no longer needed
            start += r._size

    def __getitem__(self, name: str) -> float:
        """The host value of the one-value entry ``name`` (registered with :meth:`put_each`)."""
        try:
            return self._values[self._scalars[name]]  # type: ignore[index]
        except (KeyError, TypeError):
            if self._values is None:
                raise RuntimeError("HostRead: the values were not read yet; call read() first.") from None
            raise KeyError(f"HostRead: {name!r} is not a one-value entry; use vector().") from None

    def vector(self, name: str) -> list[float]:
        """The host values of entry ``name``, flattened."""
        offset, length = self._slots[name]
        return self._host()[offset : offset + length]

    def get(self, name: str, default: float) -> float:
        """``self[name]``, or ``default`` when nothing was registered under ``name``."""
        return self[name] if name in self._scalars else default

    def _host(self) -> list[float]:
        if self._values is None:
            raise RuntimeError("HostRead: the values were not read yet; call read() first.")
        return self._values
