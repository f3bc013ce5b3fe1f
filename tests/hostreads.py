"""Counting host reads: everything the host waits for the device for, while a region of code runs.

Used by the tests (a healthy step reads at most once, or never) and by ``benchmarks/bench.py``'s
host-read column. A read is anything the host would wait for the device for, on a GPU:

* an aten op whose result is a Python value: ``_local_scalar_dense`` (``.item()``, ``bool(t)``,
  ``float(t)``, ``if t:``, ``f"{t:.2f}"``...), ``equal``, ``allclose``, ``is_nonzero``;
* an op whose output shape depends on the values: ``nonzero``, ``masked_select``, indexing by a
  boolean mask, ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``;
* a copy between the host and an accelerator that the host waits for: a blocking one either way
  (``.to("cpu")``, ``.to("cuda")``, ``cpu_tensor.copy_(cuda_tensor)``: CUDA synchronizes the
  stream), or a ``non_blocking`` one into pageable host memory; not a ``non_blocking`` copy into
  pinned memory or to the device;
* the Tensor methods that read memory without an aten op (on CPU ``tolist``, ``numpy``,
  ``__array__`` and printing dispatch nothing that shows a read), and ``cpu()`` (an explicit move
  to the host, counted on every device).

The ops are seen by a ``TorchDispatchMode``, whatever Python or C++ code calls them; the methods
are wrapped in Python while a region is open (the scalar conversions too, so that a read under
``no_dispatch`` is still seen). A read counts once however it is made: ``float(t)`` is one read,
not ``__float__`` and ``_local_scalar_dense``. Each :class:`HostReadCall` says what read and
where: the first frame outside torch and this file.

On CPU no read is a real sync, and a copy that stays on one device is invisible: ``x.to("cpu")``
of a CPU tensor does nothing and is not counted (a value read from it is); nor is
``torch.tensor(data, device="cuda")``, which copies with the modes off. The CUDA tests run the
same steps under ``torch.cuda.set_sync_debug_mode("error")`` for those.

Opening the first region imports ``torch._dynamo`` (the dispatch mode's machinery): a few seconds,
once per process. Single-process code only (no DTensor, no multi-process tests). A region counts the
reads of the thread that opened it: a background thread's (the guard's image renderer) never blocks
the step, and would land in whichever step it overlaps.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_gradguard

__all__ = ["PACKAGE_DIR", "HostReadCall", "host_reads", "host_reads_from_the_package"]

PACKAGE_DIR = str(Path(lightning_gradguard.__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_ROOT = str(Path(__file__).resolve().parents[1]) + os.sep
_aten = torch.ops.aten
# Ops whose result is a host value: the host waits for the device to compute it.
_SCALAR_OPS = {_aten._local_scalar_dense, _aten.item, _aten.equal, _aten.allclose, _aten.is_nonzero}
# Ops whose output size depends on the values: the host reads the size before it allocates.
_SHAPE_OPS = {
    _aten.nonzero, _aten.masked_select, _aten.bincount, _aten._unique, _aten._unique2, _aten.unique_dim,
    _aten.unique_consecutive, _aten.unique_dim_consecutive,
}  # fmt: skip
_COPY_OPS = {_aten._to_copy, _aten.copy_, _aten.copy, _aten._copy_from, _aten._copy_from_and_resize}
_WATCHED_OPS = _SCALAR_OPS | _SHAPE_OPS | _COPY_OPS | {_aten.index, _aten.repeat_interleave}
# Tensor methods that read without an aten op on CPU (tolist, numpy, __array__, __repr__), an explicit
# move to the host (cpu), and the scalar conversions (also seen as _local_scalar_dense).
_METHODS = ("tolist", "numpy", "__array__", "__repr__", "cpu", "item", "__bool__", "__float__", "__int__",
            "__index__", "__complex__")  # fmt: skip


@dataclass(frozen=True)
class HostReadCall:
    """One host read: what read (``Tensor.tolist``, ``aten.equal``, ``aten._to_copy cuda:0->cpu``...) and
    where (``path:line`` of the first frame outside torch and this file)."""

    what: str
    where: str

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"

    __repr__ = __str__


class _Region:
    def __init__(self, under: str | None) -> None:
        self.calls: list[HostReadCall] = []
        self.under = under
        self.thread = threading.get_ident()  # the thread whose reads count (the wrapped methods are global)

    def record(self, what: str) -> None:
        if threading.get_ident() != self.thread:  # another thread's (a background renderer's): not this code's
            return
        where, files = _stack()
        if self.under is None or any(f.startswith(self.under) for f in files):
            self.calls.append(HostReadCall(what, where))


_open: list[_Region] = []  # the open regions; the methods are wrapped while there is one
_originals: dict[str, Any] = {}
_depth = threading.local()  # > 0 inside a counted read: what it calls is the same read


def _stack() -> tuple[str, list[str]]:
    """(``path:line`` of the first frame outside torch and this file, every frame's file)."""
    frame, where, files = sys._getframe(1), "?", []
    while frame is not None:
        name = frame.f_code.co_filename
        files.append(name)
        if where == "?" and not name.startswith(_TORCH_DIR) and name != __file__:
            where = f"{name.removeprefix(_ROOT)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return where, files


def _record(what: str) -> None:
    """A read, in every open region (the first mode or method to see it records it; nested ones see it
    inside and leave it)."""
    for region in _open:
        region.record(what)


def _wrap(name: str, fn: Any) -> Any:
    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            out = fn(self, *args, **kwargs)
        finally:
            _depth.n = depth
        if depth == 0 and self.device.type != "meta":
            _record(f"Tensor.{name}")
        return out

    counted.__name__ = counted.__qualname__ = name
    return counted


def copy_waits(src: torch.device, dst: torch.device, non_blocking: bool, pinned: bool) -> bool:
    """Whether the host waits for a copy from ``src`` to ``dst`` (``pinned``: the host memory of a copy to
    the host is): a blocking copy between the host and an accelerator, either way, or a ``non_blocking``
    one into pageable host memory."""
    kinds = {src.type, dst.type}
    if len(kinds) != 2 or "cpu" not in kinds or "meta" in kinds:
        return False  # on one device, between two accelerators, or no data
    return not non_blocking or (dst.type == "cpu" and not pinned)


def _copy(func: Any, args: tuple[Any, ...], out: Any) -> tuple[torch.device, torch.Tensor]:
    """(source device, destination tensor) of a copy op."""
    packet = func.overloadpacket
    if packet is _aten._to_copy:
        return args[0].device, out
    if packet in (_aten.copy_, _aten.copy):
        return args[1].device, out
    return args[0].device, args[1]  # _copy_from(self, dst), _copy_from_and_resize(self, dst)


def _read_by(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> str | None:
    """The name of the read ``func`` made, or None."""
    packet = func.overloadpacket
    if packet in _SCALAR_OPS or packet in _SHAPE_OPS:
        return f"aten.{packet.__name__}"
    if packet is _aten.index:  # by a boolean mask: the size of the result is the number of True
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            return "aten.index (boolean mask)"
        return None
    if packet is _aten.repeat_interleave:
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "aten.repeat_interleave (no output_size)"
        return None
    src, dst = _copy(func, args, out)
    non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
    to_host = src.type not in ("cpu", "meta") and dst.device.type == "cpu"
    if copy_waits(src, dst.device, non_blocking, pinned=to_host and non_blocking and dst.is_pinned()):
        return f"aten.{packet.__name__} {src}->{dst.device}"
    return None


class _ReadMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in _WATCHED_OPS:
            return func(*args, **kwargs)
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            out = func(*args, **kwargs)
        finally:
            _depth.n = depth
        if depth == 0:
            what = _read_by(func, args, kwargs, out)
            if what is not None:
                _record(what)
        return out


@contextmanager
def host_reads(under: str | None = None) -> Iterator[list[HostReadCall]]:
    """Record every host read made while the ``with`` block runs, in order.

    Args:
        under: only the reads with a frame in this directory on their stack (made by that code, or by
            what it calls); every read when None.

    Example::

        >>> import torch
        >>> x = torch.ones(3)
        >>> with host_reads() as calls:
        ...     _ = x.sum() * 2          # on the device: not a read
        ...     _ = torch.equal(x, x)    # a bool on the host
        ...     _ = x.tolist()
        >>> [c.what for c in calls]
        ['aten.equal', 'Tensor.tolist']
    """
    region = _Region(under)
    if not _open:
        for name in _METHODS:
            _originals[name] = vars(torch.Tensor).get(name)  # None: inherited from TensorBase
            setattr(torch.Tensor, name, _wrap(name, getattr(torch.Tensor, name)))
    _open.append(region)
    try:
        with _ReadMode():  # type: ignore[no-untyped-call]
            yield region.calls
    finally:
        _open.remove(region)
        if not _open:
            for name, fn in _originals.items():
                if fn is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, fn)
            _originals.clear()


def host_reads_from_the_package() -> AbstractContextManager[list[HostReadCall]]:
    """:func:`host_reads` of lightning_gradguard's own code: the reads with a package frame on their stack
    (for a region that also runs other code, such as a whole ``Trainer.fit``)."""
    return host_reads(under=PACKAGE_DIR + os.sep)
