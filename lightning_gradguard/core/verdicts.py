"""The replay's verdicts, in words shared by the replay on one rank (:mod:`.attribution`) and across
ranks (:mod:`.cross_replay`): the constants, whether a result reproduced the fault, where a process
runs, and an exception in an event's words.

Example::

    >>> reproduced({"verdict": DATA}), reproduced({"verdict": TRANSIENT})
    (True, False)
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DATA", "DEVICE", "FAILED", "PRECISION", "TRANSIENT", "VERDICTS", "reproduced", "said", "where_am_i"]

TRANSIENT, PRECISION, DATA, FAILED = "transient", "precision", "data or numerics", "replay failed"
DEVICE = "device"  # a verdict of its own form: "device: rank r (host, device)"
VERDICTS = (TRANSIENT, PRECISION, DATA, FAILED, DEVICE)


def reproduced(result: dict[str, Any]) -> bool:
    """The replay reproduced the fault (a verdict of precision, or data or numerics)."""
    return result.get("verdict") in (PRECISION, DATA)


def said(exc: BaseException) -> str:
    """An exception in an event's words: its type and the first line of its message, at most 200
    characters (a collective's timeout carries pages of the backend's own text)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}{'...' if len(first) > 200 or len(text) > 1 else ''}"


def where_am_i(params: Sequence[Tensor]) -> dict[str, Any]:
    """The rank, host and device of this process (for a transient verdict)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    device = params[0].device if params else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"rank": rank, "host": platform.node(), "device": str(device), "device_name": name}
