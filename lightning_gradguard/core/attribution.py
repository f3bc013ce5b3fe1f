"""Why did it break? Replay a faulty step to tell a transient fault from a precision or a data fault.

On the first non-finite step the guard replays the step: the RNG state from before its forward
pass is restored, and the forward and backward passes run again on the same batch, from the same
weights, with ``torch.autograd.grad`` into separate buffers, so that ``.grad``, the optimizer and the
RNG stream of the run are untouched. During a replay, forward hooks on every module find the first
module, in execution order, whose output is non-finite, and whether its input already was.

The verdict:

=====================  ===============================================================================
``transient``          the replay is finite (twice): the fault did not reproduce. Suspect the hardware;
                       the rank, host and device are named.
``precision``          it reproduces in the run's reduced precision (bf16/fp16 autocast), but a float32
                       replay is finite: the forward origin says where the values left their range.
``data or numerics``   it reproduces in float32 too: the batch, or an operation (``log``, ``exp``, a
                       division) that breaks on it; the forward origin names the module.
``replay failed``      the replay itself raised (``replay failed: <reason>``); the run goes on.
=====================  ===============================================================================

Healthy steps pay only for keeping a reference to the batch and the RNG state before the forward
pass (``capture_rng``: a few kilobytes copied on the host).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.dump import capture_rng, restore_rng
from lightning_gradguard.primitives.layout import strip_wrappers

__all__ = ["TRANSIENT", "VERDICTS", "Replay", "attribute", "replay_once", "where_am_i"]

TRANSIENT, PRECISION, DATA, FAILED = "transient", "precision", "data or numerics", "replay failed"
VERDICTS = (TRANSIENT, PRECISION, DATA, FAILED)


@dataclass
class Replay:
    """One replay: finite or not, and where the forward pass first went non-finite."""

    finite: bool = True
    loss_finite: bool = True
    origin: str | None = None  # the first module (execution order) whose output is non-finite
    input_nonfinite: bool = False  # that module's input was already non-finite
    error: str | None = None


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _finite(obj: Any) -> bool:
    parts = [t for t in _tensors(obj) if t.is_floating_point() or t.is_complex()]
    return all(bool(torch.isfinite(t.detach()).all()) for t in parts)  # a replay: host reads are fine


@contextlib.contextmanager
def _forward_origin(model: nn.Module | None, found: Replay) -> Iterator[None]:
    """Hooks on every named module: the first whose output is non-finite (in completion order)."""
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: nn.Module, args: Any, output: Any) -> None:
            if found.origin is None and not _finite(output):
                found.origin = name or type(module).__name__
                found.input_nonfinite = not _finite(args)

        return check

    if model is not None:
        handles = [m.register_forward_hook(hook(strip_wrappers(n))) for n, m in model.named_modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def replay_once(
    closure: Callable[[], Any],
    params: Sequence[Tensor],
    *,
    model: nn.Module | None = None,
    rng: dict[str, Any] | None = None,
    precision: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    spike_norm: float | None = None,
) -> Replay:
    """Run ``closure`` (forward, returning the loss) and its backward once, into separate buffers.

    ``precision``: a context for the forward pass (the run's autocast); None replays in float32
    (autocast disabled). ``spike_norm``: the step was a finite spike of this total norm; the replay
    reproduces it when its own total norm is at least half of it.
    """
    found = Replay()
    saved = capture_rng()
    if rng is not None:
        restore_rng(rng)
    device = params[0].device.type if params else "cpu"
    context = precision() if precision is not None else torch.autocast(device, enabled=False)
    try:
        with torch.enable_grad(), _forward_origin(model, found), context:
            out = closure()
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, Tensor):
            raise TypeError(f"the step returned {type(out).__name__}, not a loss tensor")
        wanted = [p for p in params if p.requires_grad]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        present = [g for g in grads if g is not None]
        found.loss_finite = _finite(loss)
        found.finite = found.loss_finite and _finite(present)
        if spike_norm is not None and found.finite and present:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present])))
            found.finite = norm < 0.5 * spike_norm  # "finite" here: the spike did not reproduce
    except Exception as exc:  # a replay must never crash the run
        found.error = f"{type(exc).__name__}: {exc}"
    finally:
        restore_rng(saved)
    return found


def where_am_i(params: Sequence[Tensor]) -> dict[str, Any]:
    """The rank, host and device of this process (for a transient verdict)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    device = params[0].device if params else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"rank": rank, "host": platform.node(), "device": str(device), "device_name": name}


def attribute(
    closure: Callable[[], Any],
    params: Sequence[Tensor],
    *,
    model: nn.Module | None = None,
    rng: dict[str, Any] | None = None,
    precision: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    spike_norm: float | None = None,
) -> dict[str, Any]:
    """Replay a faulty step and conclude (see the module's table).

    Args:
        closure: runs the step's forward pass on the kept batch and returns the loss.
        params: the parameters to differentiate (the optimizer's).
        model: the module whose submodules' outputs are checked (the forward origin).
        rng: the RNG state from before the step's forward pass.
        precision: the run's reduced-precision context (autocast), or None for a float32 run.
        spike_norm: for a finite spike, its total norm (a replay reproduces it at half of it or more).

    Returns:
        ``{"verdict", "forward_origin", "input_nonfinite", "replays", "seconds", "rank", "host",
        "device", "device_name"}`` (and ``"error"`` for a failed replay).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> x = torch.tensor([[float("nan"), 1.0]])
        >>> out = attribute(lambda: model(x).sum(), list(model.parameters()), model=model)
        >>> out["verdict"], out["forward_origin"], out["input_nonfinite"]
        ('data or numerics', '0', True)
    """
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"model": model, "rng": rng, "spike_norm": spike_norm}
    first = replay_once(closure, params, precision=precision, **kwargs)
    replays, chosen = 1, first
    if first.error is not None:
        verdict = f"{FAILED}: {first.error}"
    elif first.finite:
        second = replay_once(closure, params, precision=precision, **kwargs)  # confirm
        replays += 1
        verdict, chosen = (TRANSIENT, first) if second.finite else (DATA, second)
    elif precision is not None:
        full = replay_once(closure, params, precision=None, **kwargs)
        replays += 1
        verdict = PRECISION if full.finite and full.error is None else DATA
        chosen = first if verdict == PRECISION else full
    else:
        verdict = DATA
    out = {
        "verdict": verdict,
        "forward_origin": chosen.origin,
        "input_nonfinite": chosen.input_nonfinite,
        "loss_finite": chosen.loss_finite,
        "replays": replays,
        "seconds": round(time.perf_counter() - start, 4),
        **where_am_i(params),
    }
    if first.error is not None:
        out["error"] = first.error
    return out


def describe(result: dict[str, Any]) -> str:
    """One sentence for the event's message and the alert."""
    verdict = str(result.get("verdict", ""))
    where = result.get("forward_origin")
    origin = ""
    if where:
        origin = f"; the forward pass first went non-finite in {where}"
        if result.get("input_nonfinite"):
            origin += " (its input was already non-finite: the data or a carried state)"
    if verdict == TRANSIENT:
        ranks = result.get("faulty_ranks")
        on = f"rank(s) {', '.join(map(str, ranks))}" if ranks else f"rank {result.get('rank', 0)}"
        where = f"{on}, host {result.get('host')}, {result.get('device')} ({result.get('device_name')})"
        tries = result.get("replays", 2)
        return f"Replay: transient (did not reproduce in {tries} replays): suspect the hardware on {where}."
    if verdict == PRECISION:
        return f"Replay: precision (reproduces in reduced precision, finite in float32){origin}."
    if verdict == DATA:
        return f"Replay: data or numerics (reproduces in float32){origin}."
    return f"Replay: {verdict}."
