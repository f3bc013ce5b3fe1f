"""Counting host reads (device-to-host copies) made by lightning_gradguard's own code.

Used by the tests (a healthy step reads at most once, or never) and by ``benchmarks/bench.py``'s
host-read column. On CPU no copy is a real sync, but each of these calls would be one on a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_READS = ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextmanager
def host_reads_from_the_package() -> Iterator[list[str]]:
    """Count the tensor-to-host reads called directly from lightning_gradguard's own code."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if "lightning_gradguard" in caller and "tests" not in caller:
                calls.append(f"{name} from {caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
