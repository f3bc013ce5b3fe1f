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
``device: rank r (…)`` under data parallelism: it reproduces on rank ``r``, but not with the same batch
                       replayed on another rank (the *partner*): suspect that device (below).
=====================  ===============================================================================

**Which device? Replaying on another rank.** Under data parallelism the faulty rank (the DDP
communication hook keeps each rank's own fault) also sends its batch, with its RNG state, to a
partner, the next rank that is not itself faulty, which replays it from its own (identical) weights
(:func:`replay_across`). The first faulty rank only: a replay on a partner costs it a few forward and
backward passes while every other rank waits; the other faulty ranks are still named. It reproduces on the
partner: ``data or numerics`` (or the partner's ``precision``), "reproduced on rank p"; only on the
faulty rank: ``device: rank r (host, device)``, with a ``suspect`` in the result; nowhere:
``transient``. A replay that raises on the partner is ``replay failed: rank p could not replay rank r's
batch: <reason>``. Every rank takes part in each collective of the exchange, in the same order, on a
group of its own whose collectives time out after :data:`EXCHANGE_TIMEOUT_S`. It needs a closure that
can take another batch (:class:`ReplayClosure`); a plain closure gets no cross-rank replay, and the
event says so.

A finite spike (``spike_skipped``) is reproduced by a replay whose total gradient norm is at least
:data:`SPIKE_REPRODUCED` (half) of the step's (``grad_norms`` beside ``spike_norm`` in the result).

Healthy steps pay only for keeping a reference to the batch and the RNG state before the forward
pass (``capture_rng``: a few kilobytes copied on the host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.dump import capture_rng, restore_rng
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.layout import strip_wrappers

__all__ = [
    "EXCHANGE_TIMEOUT_S", "SPIKE_REPRODUCED", "TRANSIENT", "VERDICTS", "Replay", "ReplayAttribution",
    "ReplayClosure", "attribute", "conclude_cross", "describe", "exchange_group", "gather_verdicts",
    "keep_attributes", "move_batch", "plan_cross_replay", "replay_across", "replay_batch_of", "replay_once",
    "replaying_from", "where_am_i",
]  # fmt: skip

TRANSIENT, PRECISION, DATA, FAILED = "transient", "precision", "data or numerics", "replay failed"
DEVICE = "device"  # a verdict of its own form: "device: rank r (host, device)"
VERDICTS = (TRANSIENT, PRECISION, DATA, FAILED, DEVICE)

# Every collective of a cross-rank replay's exchange (the ranks' own verdicts, the batch, the partner's
# verdict) gives up after this long: the slowest rank's own replays (up to three forward and backward
# passes of one step), then the partner's. A rank whose collective times out reports ``replay failed``
# and goes on.
EXCHANGE_TIMEOUT_S = 300.0
# A replay reproduces a finite spike when its total gradient norm is at least this fraction of the step's.
# Why a fraction, and why half: on one process a replay of the batch from the same weights gives the step's
# norm to rounding, but the replay runs in float32 where the step may have run in reduced precision
# (bfloat16 alone is ~1e-2 relative), and a replay sees one batch where the step may have accumulated
# several. Under data parallelism over W ranks the step's norm is that of the *mean* of the ranks'
# gradients, which by the triangle inequality is at most the largest rank's own: the rank whose batch made
# the spike replays it at the step's norm or more (about W times it when its batch alone made it), so half
# loses no true reproduction. A replay that does not reproduce it comes back to the run's usual norm, which
# the skipped spike exceeded by ``skip_spikes`` standard deviations: below half of it unless the spike was
# under twice the usual norm (then a transient spike may read as reproduced: the limit of a norm alone).
SPIKE_REPRODUCED = 0.5


@dataclass
class Replay:
    """One replay: finite or not, and where the forward pass first went non-finite."""

    finite: bool = True
    loss_finite: bool = True
    origin: str | None = None  # the first module (execution order) whose output is non-finite
    input_nonfinite: bool = False  # that module's input was already non-finite
    # Where that input became non-finite, when an operation of the forward pass made it so (rather
    # than the data, a carried state or the weights): {"op", "in", "after", "before"}.
    produced: dict[str, str | None] | None = None
    weights_nonfinite: bool = False  # that non-finite input was a parameter of the model
    error: str | None = None
    grad_norm: float | None = None  # a spike's replay: its total gradient norm (None: not finite)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _finite(obj: Any) -> bool:
    parts = [t for t in _tensors(obj) if _is_float(t)]
    return all(bool(torch.isfinite(t.detach()).all()) for t in parts)  # a replay: host reads are fine


def _nonfinite(obj: Any) -> list[Tensor]:
    return [t for t in _tensors(obj) if _is_float(t) and not bool(torch.isfinite(t.detach()).all())]


# Functions whose output is uninitialised memory (any bit pattern, NaN included, until written).
_UNINITIALISED = ("empty", "empty_like", "new_empty", "empty_strided", "resize_")
_IN_PLACE_DUNDERS = ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__imatmul__")


def _in_place(name: str, kwargs: Any) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS or "out" in kwargs


class _Origin:
    """Finds where a replayed forward pass first went non-finite (see :func:`replay_once`).

    Two views of one forward pass:

    * hooks on every module keep the stack of modules in progress, and name the first module, in
      completion order, whose output is non-finite (the *origin*), and whether its input already was;
    * a :class:`~torch.overrides.TorchFunctionMode` sees every torch function and tensor method called
      from Python, the functional code between modules included, and keeps, for each non-finite
      tensor one of them returned, the first function of its chain that made finite inputs
      non-finite, with the module whose forward called it. So a non-finite input is told apart: code
      between two modules made it (a ``torch.log`` in a parent's ``forward``), or it came from outside
      the forward pass (the data, a carried state, the weights).

    The origin is the first non-finite *module output*, not the first non-finite value: an attention
    mask filled with ``-inf`` on purpose is non-finite and harmless. (A TorchDispatchMode would also
    see inside fused kernels, but entering one imports ``torch._dynamo``, seconds on first use;
    module outputs cover what runs inside a module.)
    """

    def __init__(self, model: nn.Module | None, found: Replay) -> None:
        self.model = model
        self.found = found
        self.stack: list[tuple[str, int]] = []  # (name, id) of the modules in progress
        self.last_child: dict[int | None, str] = {}  # a module's (None: the step's own code) last finished child
        self.produced: dict[int, tuple[Tensor, dict[str, str | None] | None]] = {}  # id -> (tensor, root)
        self.params = {id(p) for p in model.parameters()} if model is not None else set()
        self.waiting: dict[str, str | None] | None = None  # a root whose next module is not yet known
        self.done = False
        self.quiet = False  # the hooks' own checks, which the mode must not track

    # -------------------------------------------------------------- the modules
    def pre(self, name: str) -> Callable[..., None]:
        def enter(module: nn.Module, args: Any) -> None:
            shown = name or type(module).__name__
            parent = self.stack[-1][1] if self.stack else None
            if self.waiting is not None and self.waiting.get("_parent") == str(parent):
                self.waiting["before"], self.waiting = shown, None
            self.stack.append((shown, id(module)))

        return enter

    def post(self, name: str) -> Callable[..., None]:
        def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            shown = name or type(module).__name__
            if self.stack and self.stack[-1][1] == id(module):
                self.stack.pop()
            self.last_child[self.stack[-1][1] if self.stack else None] = shown
            if self.done:
                return
            self.quiet = True
            try:
                self._check(module, shown, args, kwargs, output)
            finally:
                self.quiet = False

        return leave

    def _check(self, module: nn.Module, shown: str, args: Any, kwargs: Any, output: Any) -> None:
        if _finite(output):
            return
        self.done = True
        found = self.found
        found.origin = shown
        bad = _nonfinite((args, kwargs))
        found.input_nonfinite = bool(bad)
        for t in bad:
            kept = self.produced.get(id(t))
            if kept is not None and kept[0] is t and kept[1] is not None:
                root = found.produced = {k: v for k, v in kept[1].items() if not k.startswith("_")}
                if root["in"] is not None:  # a module's own code, between its children, made it
                    found.origin, found.input_nonfinite = root["in"], False
                return
        own = list(module.parameters(recurse=False))
        found.weights_nonfinite = any(id(t) in self.params for t in bad) or (not bad and not _finite(own))

    # -------------------------------------------------------------- the functions
    def call(self, func: Any, args: Any, kwargs: Any) -> Any:
        name = str(getattr(func, "__name__", func))
        if self.done or self.quiet or name in _UNINITIALISED:
            return func(*args, **kwargs)
        in_place = _in_place(name, kwargs)
        before = _nonfinite((args, kwargs)) if in_place else None  # an in-place call overwrites its input
        out = func(*args, **kwargs)
        targets = [out, args[0] if in_place and args else None, kwargs.get("out")]
        outputs = [t for t in _tensors(targets) if _is_float(t)]
        bad_out = [t for t in outputs if not bool(torch.isfinite(t.detach()).all())]
        for t in outputs:
            if all(t is not b for b in bad_out):
                self.produced.pop(id(t), None)  # written finite again (in place)
        if not bad_out:
            return out
        bad_in = before if before is not None else _nonfinite((args, kwargs))
        root: dict[str, str | None] | None = None  # None: from outside the forward pass
        for t in bad_in:
            kept = self.produced.get(id(t))
            if kept is not None and kept[0] is t:
                root = kept[1]
                break
        else:
            # Finite tensor inputs, a non-finite result: this function made it. Without any tensor
            # input (``torch.tensor``, ``torch.full``) it only brought values in: data, or a carried state.
            if not bad_in and any(True for _ in _tensors((args, kwargs))):
                parent = self.stack[-1][1] if self.stack else None
                root = {"op": name.strip("_") or name, "in": self.stack[-1][0] if self.stack else None,
                        "after": self.last_child.get(parent), "before": None, "_parent": str(parent)}  # fmt: skip
                self.waiting = root
        for t in bad_out:
            self.produced[id(t)] = (t, root)
        return out

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        from torch.overrides import TorchFunctionMode

        tracker = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                return tracker.call(func, args, kwargs or {})

        handles = []
        if self.model is not None:
            for n, m in self.model.named_modules():
                name = strip_wrappers(n)
                handles.append(m.register_forward_pre_hook(self.pre(name)))
                handles.append(m.register_forward_hook(self.post(name), with_kwargs=True))
        try:
            with Mode():
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.produced.clear()


def keep_attributes(obj: object | None) -> dict[str, Any] | None:
    """The references in ``obj``'s attribute dict (a shallow copy, no tensor copied), or None for None:
    kept before each step's forward pass, so that a replay starts from the state the step began with
    (:func:`replaying_from`)."""
    return None if obj is None else dict(vars(obj))


def replaying_from(obj: object, before: dict[str, Any], closure: Callable[[], Any]) -> Callable[[], Any]:
    """``closure``, run with ``obj``'s attributes as they were in ``before``, then put back as they are now.

    A step that carries state across steps by reassigning an attribute (``self.hidden = h.detach()``
    in truncated BPTT) has already replaced it with its own result when the guard replays it; the
    replay must start from the state the step began with. Only reassignments are undone: a tensor the
    step changed *in place* (``self.hidden.copy_(h)``) is the same object before and after, and a
    replay cannot restore it.

    Example::

        >>> class Loop:
        ...     hidden = None
        >>> loop = Loop(); loop.hidden = 1.0
        >>> before = keep_attributes(loop)
        >>> loop.hidden = float("nan")          # the step's forward pass replaced it
        >>> replaying_from(loop, before, lambda: loop.hidden)()
        1.0
        >>> loop.hidden
        nan
    """

    def replay() -> Any:
        state = vars(obj)
        after = dict(state)
        _set_attributes(state, before)
        try:
            return closure()
        finally:
            _set_attributes(state, after)

    return replay


def _set_attributes(state: dict[str, Any], wanted: dict[str, Any]) -> None:
    for key in [k for k in state if k not in wanted]:
        del state[key]
    for key, value in wanted.items():
        if state.get(key, _MISSING) is not value:
            state[key] = value


_MISSING = object()


class ReplayClosure:
    """A step's replay closure that can also run the step on another batch (a cross-rank replay).

    ``closure()`` runs the step's forward pass on the kept batch (``closure.batch``) and returns the
    loss; ``closure.on(batch)`` is the same closure for another batch. Pass one as
    ``GuardCore.step(replay_closure=...)`` to have a fault on one rank replayed on another too; a plain
    no-argument callable works as ever and gets no cross-rank replay. The Lightning adapter builds one
    from ``training_step`` (``integrations/lightning/replay.py``).

    Args:
        step: runs the step's forward pass on a batch and returns the loss (``step(batch)``).
        batch: the step's own batch (a reference; nothing is copied).

    Example::

        >>> closure = ReplayClosure(lambda batch: sum(batch), [1, 2])
        >>> closure(), closure.on([3, 4])(), closure.batch
        (3, 7, [1, 2])
    """

    def __init__(self, step: Callable[[Any], Any], batch: Any) -> None:
        self.step = step
        self.batch = batch

    def __call__(self) -> Any:
        return self.step(self.batch)

    def on(self, batch: Any) -> ReplayClosure:
        """The same step on ``batch``."""
        return type(self)(self.step, batch)


def _takes_batches(closure: Any) -> bool:
    """The closure can run the step on another batch (:class:`ReplayClosure` or any object alike)."""
    return hasattr(closure, "batch") and callable(getattr(closure, "on", None))


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it on ``device`` (detached): tensors in lists, tuples, named tuples,
    mappings and dataclasses, or an object with a ``.to(device)`` of its own (a tokenizer's
    ``BatchEncoding``); anything else as it is.

    Example::

        >>> import torch
        >>> moved = move_batch({"x": torch.ones(2), "ids": [torch.zeros(1), "text"]}, "cpu")
        >>> moved["x"].device.type, moved["ids"][1]
        ('cpu', 'text')
    """
    if isinstance(batch, Tensor):
        return batch.detach().to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(move_batch(x, device) for x in batch))
    if isinstance(batch, (list, tuple)):
        items = [move_batch(x, device) for x in batch]
        return items if type(batch) is list else tuple(items) if type(batch) is tuple else type(batch)(items)
    if isinstance(batch, Mapping):
        moved = {k: move_batch(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:
            return moved
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {f.name: move_batch(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **fields)  # type: ignore[type-var]
    if callable(getattr(batch, "to", None)) and not isinstance(batch, nn.Module):
        return batch.to(device)
    return batch


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
    reproduces it when its own total norm (``grad_norm``) is at least :data:`SPIKE_REPRODUCED` of it.
    """
    found = Replay()
    saved = capture_rng()
    device = params[0].device.type if params else "cpu"
    try:
        if rng is not None:  # in the try: another rank's RNG state may not fit this process's devices
            restore_rng(rng)
        context = precision() if precision is not None else torch.autocast(device, enabled=False)
        with torch.enable_grad(), _Origin(model, found).watching(), context:
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
            found.grad_norm = norm
            found.finite = norm < SPIKE_REPRODUCED * spike_norm  # "finite" here: the spike did not reproduce
    except Exception as exc:  # a replay must never crash the run
        found.error = f"{_said(exc)}"
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
        ``{"verdict", "forward_origin", "input_nonfinite", "loss_finite", "replays", "seconds", "rank",
        "host", "device", "device_name"}``, and ``"error"`` for a failed replay; for a spike,
        ``"spike_norm"`` (the step's total norm) and ``"grad_norms"`` (each replay's, None where it was
        not finite).

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
    done, chosen = [first], first
    if first.error is not None:
        verdict = f"{FAILED}: {first.error}"
    elif first.finite:
        second = replay_once(closure, params, precision=precision, **kwargs)  # confirm
        done.append(second)
        verdict, chosen = (TRANSIENT, first) if second.finite else (DATA, second)
    elif precision is not None:
        full = replay_once(closure, params, precision=None, **kwargs)
        done.append(full)
        verdict = PRECISION if full.finite and full.error is None else DATA
        chosen = first if verdict == PRECISION else full
    else:
        verdict = DATA
    replays = len(done)
    out = {
        "verdict": verdict,
        "forward_origin": chosen.origin,
        "input_nonfinite": chosen.input_nonfinite,
        "loss_finite": chosen.loss_finite,
        "replays": replays,
        "seconds": round(time.perf_counter() - start, 4),
        **where_am_i(params),
    }
    if chosen.produced is not None:
        out["produced"] = chosen.produced
    if chosen.weights_nonfinite:
        out["weights_nonfinite"] = True
    if first.error is not None:
        out["error"] = first.error
    if spike_norm is not None:
        out["spike_norm"] = spike_norm
        out["grad_norms"] = [r.grad_norm for r in done]
    return out


def describe(result: dict[str, Any]) -> str:
    """One sentence for the event's message and the alert.

    Example::

        >>> describe({"verdict": "data or numerics", "forward_origin": "net", "input_nonfinite": False,
        ...           "produced": {"op": "log", "in": "net", "after": "l0", "before": "l1"}})[50:]
        'the forward pass first went non-finite between l0 and l1, in the forward of net (log of finite values).'
    """
    verdict = str(result.get("verdict", ""))
    origin = _where(result)
    cross = result.get("cross") if isinstance(result.get("cross"), dict) else None
    partner = f"rank {cross.get('rank')}" if cross is not None else ""
    batch = f"rank {cross.get('batch_of')}'s batch" if cross is not None else ""
    also = f"; reproduced on {partner} with {batch}" if cross is not None and _reproduced(cross) else ""
    if verdict == TRANSIENT:
        ranks = result.get("faulty_ranks")
        on = f"rank(s) {', '.join(map(str, ranks))}" if ranks else f"rank {result.get('rank', 0)}"
        where = f"{on}, host {result.get('host')}, {result.get('device')} ({result.get('device_name')})"
        tries = result.get("replays", 2)
        nor = ""
        if cross is not None and cross.get("verdict") == TRANSIENT:
            nor = f", nor in {cross.get('replays')} on {partner} with {batch}"
        text = f"Replay: transient (did not reproduce in {tries} replays{nor}): suspect the hardware on {where}"
    elif verdict.startswith(f"{DEVICE}:"):
        sus = result.get("suspect") or {}
        text = (
            f"Replay: device (reproduces on rank {sus.get('rank')}, but not with its batch on {partner}): suspect "
            f"the device of rank {sus.get('rank')}, host {sus.get('host')}, {sus.get('device')} "
            f"({sus.get('device_name')}){origin}"
        )
    elif verdict == PRECISION:
        text = f"Replay: precision (reproduces in reduced precision, finite in float32{also}){origin}"
    elif verdict == DATA:
        text = f"Replay: data or numerics (reproduces in float32{also}){origin}"
    else:
        text = f"Replay: {verdict}"
        ranks = result.get("ranks")
        if cross is not None and isinstance(ranks, list) and verdict.startswith(f"{FAILED}: {partner} "):
            r = int(cross.get("batch_of", 0))
            text += f" (rank {r}'s own replay: {ranks[r].get('verdict')})"
    if cross is not None and str(cross.get("verdict")).startswith(FAILED) and not verdict.startswith(FAILED):
        text += f"; {partner} could not replay {batch}: {str(cross['verdict']).removeprefix(f'{FAILED}: ')}"
    return f"{text}{_norms(result, cross)}{_no_cross(result)}."


def _reproduced(result: dict[str, Any]) -> bool:
    """The replay reproduced the fault (a verdict of precision, or data or numerics)."""
    return result.get("verdict") in (PRECISION, DATA)


def _norms(result: dict[str, Any], cross: dict[str, Any] | None) -> str:
    """A spike's total gradient norm in the step and in each replay, as a clause ("" for a non-finite fault)."""
    if result.get("spike_norm") is None:
        return ""

    def shown(norms: Any) -> str:
        return ", ".join("non-finite" if n is None else f"{n:.4g}" for n in norms or ())

    text = f"; total gradient norm {result['spike_norm']:.4g} in the step, {shown(result.get('grad_norms'))} in "
    text += f"the replays on rank {result.get('rank', 0)}"
    if cross is not None and cross.get("grad_norms"):
        text += f", {shown(cross['grad_norms'])} on rank {cross.get('rank')}"
    return text


def _no_cross(result: dict[str, Any]) -> str:
    why = result.get("no_cross")
    return f"; no cross-rank replay: {why}" if why else ""


def _where(result: dict[str, Any]) -> str:
    """Where the forward pass first went non-finite, as a clause ("" when nothing was found)."""
    origin = result.get("forward_origin")
    made = result.get("produced")
    if isinstance(made, dict):
        after, before = made.get("after"), made.get("before")
        span = (f"between {after} and {before}" if after and before else f"after {after}" if after
                else f"before {before}" if before else "")  # fmt: skip
        inside = f"in the forward of {made['in']}" if made.get("in") else "in the step's own code"
        return (
            f"; the forward pass first went non-finite {', '.join(x for x in (span, inside) if x)} "
            f"({made.get('op')} of finite values)"
        )
    if not origin:
        return ""
    text = f"; the forward pass first went non-finite in {origin}"
    if result.get("weights_nonfinite"):
        return text + " (its weights were already non-finite)"
    if result.get("input_nonfinite"):
        return text + " (its input was already non-finite: the data or a carried state)"
    return text


class ReplayAttribution(GuardComponent):
    """``replay=True``: the guard's ``replay`` component. ``begin_step`` keeps the RNG state and
    references to the watched model's attributes; the first ``nonfinite`` and the first
    ``spike_skipped`` event of a run are replayed (:func:`attribute`) before they are emitted, and
    their verdict goes into the event's ``extra["replay"]`` and message. Under data parallelism every
    rank replays its own batch, the verdicts are gathered (a collective on a faulty step, which every
    rank settles together), naming the faulty ranks, and the first faulty rank's batch is replayed on a
    partner rank too (:func:`replay_across`), on a process group of the component's own, created at
    ``setup`` (a collective of every rank), whose collectives time out after :data:`EXCHANGE_TIMEOUT_S`.

    ``local_grad_fault`` (set by a DDP communication hook, see the Lightning adapter) says whether
    this rank's own gradients were non-finite before the all-reduce averaged them.
    """

    name = "replay"
    order = 50

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.local_grad_fault: Tensor | None = None
        self._rng: dict[str, Any] | None = None  # the RNG state before the step's forward pass
        self._attrs: dict[str, Any] | None = None  # the model's attributes then (references)
        self._replayed: set[str] = set()  # the kinds already replayed (the first of each)
        self._group: Any = None  # the exchange's process group (data parallelism only)
        self._broken = False  # an exchange failed (timed out): the group's state is unknown, not used again

    def __getstate__(self) -> dict[str, Any]:
        # The model's attributes, the RNG state and the process group belong to the live run (the
        # attributes hold the Trainer): not part of a pickle of the guard.
        state = self.__dict__.copy()
        state.update(model=None, _rng=None, _attrs=None, _group=None)
        return state

    def setup(self, setup: Setup) -> None:
        self.model = setup.model
        if setup.world_size > 1 and not setup.sharded and self._group is None:  # no replay of shards
            self._group = exchange_group()

    def begin_step(self, step: int, logging: bool) -> None:
        self._rng = capture_rng()
        self._attrs = keep_attributes(self.model)

    def register(self, ctx: StepContext) -> None:
        if ctx.replay_closure is not None:
            ctx.extra["replay"] = (ctx.replay_closure, ctx.replay_precision, self._rng, self._attrs)

    def flags_reduced(self, ctx: StepContext, flags: dict[str, Tensor]) -> None:
        own, self.local_grad_fault = self.local_grad_fault, None
        grad, loss = ctx.local("grad_bad"), ctx.local("loss_bad")
        if grad is not None and loss is not None:  # under data parallelism: this rank's own faults
            mine = grad if own is None else own.to(grad.device, torch.float32)
            ctx.extra["local_bad"] = torch.stack([mine, loss])

    def enrich(self, ctx: StepContext | None, event: GradEvent) -> GradEvent:
        if ctx is None or event.kind not in ("nonfinite", "spike_skipped") or event.kind in self._replayed:
            return event
        if ctx.deferred:
            return event
        self._replayed.add(event.kind)
        kept = ctx.extra.get("replay")
        if kept is None:
            return event
        closure, precision, rng, attrs = kept
        spike = float(event.value) if event.kind == "spike_skipped" else None

        def replay(closure: Callable[[], Any], rng: dict[str, Any] | None) -> dict[str, Any]:
            if attrs is not None and self.model is not None:
                closure = replaying_from(self.model, attrs, closure)
            return attribute(closure, ctx.layout.params, model=self.model, rng=rng, precision=precision,
                             spike_norm=spike)  # fmt: skip

        mine = replay(closure, rng)
        local = ctx.extra.get("local_bad")
        mine["local_fault"] = bool(local.sum() > 0) if local is not None else True
        if self._broken:  # no collective: the ranks may no longer be in step on it
            result = {**mine, "faulty_ranks": [mine["rank"]] if mine["local_fault"] else [],
                      "no_cross": "an earlier exchange failed"}  # fmt: skip
        elif self._group is None:  # one process (or a loop that never called prepare: gathered as ever)
            result = gather_verdicts(mine)
        else:
            result = replay_across(mine, closure, rng, replay, ctx.layout.params, group=self._group)
            self._broken = bool(result.get("exchange_failed"))
        extra = {**event.extra, "replay": result}
        return dataclasses.replace(event, message=f"{event.message} {describe(result)}", extra=extra)


def _said(exc: BaseException) -> str:
    """An exception in an event's words: its type and the first line of its message, at most 200
    characters (a collective's timeout carries pages of the backend's own text)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}{'...' if len(first) > 200 or len(text) > 1 else ''}"


def exchange_group() -> Any:
    """A process group of every rank for a cross-rank replay's exchange (a collective: every rank calls
    it, in the same order), whose collectives time out after :data:`EXCHANGE_TIMEOUT_S`: gloo where it
    is built (the exchange's objects travel on the host, and a gloo collective that times out raises
    rather than aborting the process), else the default backend."""
    import torch.distributed as dist

    backend = "gloo" if dist.is_gloo_available() else None
    return dist.new_group(backend=backend, timeout=timedelta(seconds=EXCHANGE_TIMEOUT_S))


def gather_verdicts(mine: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """Every rank's replay, gathered (a collective: every rank replays the same step); the verdict of
    the run is a rank's that reproduced the fault, else ``transient``, naming the faulty ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return {**mine, "faulty_ranks": [mine["rank"]]}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return _gathered(everyone, mine)


def _gathered(everyone: list[dict[str, Any]], mine: dict[str, Any]) -> dict[str, Any]:
    reproduced = [r for r in everyone if r["verdict"] != TRANSIENT]
    chosen = reproduced[0] if reproduced else next((r for r in everyone if r["local_fault"]), mine)
    faulty = [r["rank"] for r in everyone if r["local_fault"]]
    return {**chosen, "faulty_ranks": faulty, "ranks": everyone}


def replay_across(
    mine: dict[str, Any],
    closure: Callable[[], Any],
    rng: dict[str, Any] | None,
    replay: Callable[[Callable[[], Any], dict[str, Any] | None], dict[str, Any]],
    params: Sequence[Tensor],
    *,
    group: Any = None,
) -> dict[str, Any]:
    """Every rank's own replay gathered, and the first faulty rank's batch replayed on a partner rank.

    Every rank calls this on the same faulty step and takes part in each collective, in the same
    order: (1) every rank's own replay is gathered, and the plan (:func:`plan_cross_replay`) is taken
    from it, so it is the same on every rank; (2) the faulty rank ``r`` scatters its batch (on the
    host) and its RNG state to the partner ``p``, the next rank that is not itself faulty; (3) ``p``
    replays it (:func:`replay_batch_of`, which never raises) and broadcasts its result; the verdict is
    :func:`conclude_cross`'s. A collective that fails (``group``'s timeout) ends this rank's exchange
    with ``replay failed``.

    Args:
        mine: this rank's own replay (:func:`attribute`, with ``"local_fault"``).
        closure: this rank's replay closure: a :class:`ReplayClosure` (or alike) takes part fully; a
            plain callable only in the gathering, and then no rank replays another's batch.
        rng: this rank's RNG state from before the step's forward pass (sent with its batch).
        replay: ``replay(closure, rng) -> result`` (:func:`attribute` with the step's arguments).
        params: the parameters replayed (their device is where another rank's batch goes).
        group: the process group (:func:`exchange_group`); None: the default group.

    Returns:
        :func:`gather_verdicts`' result, and: ``"cross"`` (the partner's replay: :func:`attribute`'s
        keys, ``"rank"`` the partner, ``"batch_of"`` the faulty rank), ``"reproduced_on"`` (the ranks
        whose replay of that batch reproduced it), ``"suspect"`` (``{"rank", "host", "device",
        "device_name"}``, a ``device`` verdict only); or ``"no_cross"``, why no batch was replayed on
        another rank; ``"exchange_failed": True`` where a collective failed on this rank (the results
        of the ranks may differ then, and the component makes no further exchange).
    """
    import torch.distributed as dist

    try:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (mine, _takes_batches(closure)), group=group)
    except Exception as exc:  # the group's timeout: the other ranks never came
        faulty = [mine["rank"]] if mine["local_fault"] else []
        why = f"the exchange failed: {_said(exc)}"
        return {**mine, "faulty_ranks": faulty, "no_cross": why, "exchange_failed": True}
    everyone = [m for m, _ in gathered]
    result = _gathered(everyone, mine)
    plan = plan_cross_replay(everyone, all(ready for _, ready in gathered))
    if isinstance(plan, str):
        return {**result, "no_cross": plan}
    r, p = plan
    me = dist.get_rank(group)
    try:
        inputs: list[Any] | None = None
        if me == r:  # pickled here: a batch that cannot be sent must not leave the partner waiting
            inputs = [None] * len(everyone)
            inputs[p] = _pack(closure, rng, params[0].device if params else torch.device("cpu"))
        box: list[Any] = [None]
        dist.scatter_object_list(box, inputs, src=r, group=group)
        out: list[Any] = [replay_batch_of(closure, box[0], replay, params, rank=p, of=r) if me == p else None]
        dist.broadcast_object_list(out, src=p, group=group)
        partner: dict[str, Any] = out[0]
    except Exception as exc:  # the group's timeout
        why = f"{FAILED}: the exchange failed: {_said(exc)}"
        failed = {"verdict": why, "rank": p, "batch_of": r}
        return {**conclude_cross(everyone[r], failed), "faulty_ranks": result["faulty_ranks"], "ranks": everyone,
                "exchange_failed": True}  # fmt: skip
    return {**conclude_cross(everyone[r], partner), "faulty_ranks": result["faulty_ranks"], "ranks": everyone}


def plan_cross_replay(everyone: list[dict[str, Any]], ready: bool) -> tuple[int, int] | str:
    """The faulty rank whose batch a partner replays, and the partner; or why none does.

    The faulty ranks: those whose own gradients or loss were non-finite (``local_fault``) and whose own
    replay reproduced the fault; else those with ``local_fault`` (a transient fault); else those whose
    replay reproduced it (a finite spike: no rank's own values are flagged). The partner: the next rank
    after it, cyclically, that is not faulty. Only the first faulty rank.

    Example::

        >>> healthy, faulty = {"verdict": "transient"}, {"verdict": "data or numerics", "local_fault": True}
        >>> ranks = [healthy, faulty, faulty, healthy]
        >>> plan_cross_replay(ranks, True), plan_cross_replay(ranks[1:3], True), plan_cross_replay(ranks, False)
        ((1, 3), 'every rank (2) was faulty', 'the replay closure cannot take another batch')
    """
    world = len(everyone)
    local = [i for i, r in enumerate(everyone) if r.get("local_fault")]
    reproduced = [i for i, r in enumerate(everyone) if _reproduced(r)]
    faulty = [i for i in local if i in reproduced] or local or reproduced
    if not ready:
        return "the replay closure cannot take another batch"
    if not faulty:
        return "no rank was found faulty"
    if len(faulty) == world:
        return f"every rank ({world}) was faulty"
    r = faulty[0]
    return r, next((r + k) % world for k in range(1, world) if (r + k) % world not in faulty)


def _pack(closure: Any, rng: dict[str, Any] | None, device: torch.device) -> bytes | str:
    """This rank's batch (on the host) and RNG state, pickled; or why they cannot be sent. Of the CUDA
    generators, only that of this rank's ``device`` travels (:func:`_rng_here` puts it on the partner's)."""
    try:
        if rng is not None and "cuda" in rng:  # captured before the step's forward pass: one state per device
            states, rng = rng["cuda"], {k: v for k, v in rng.items() if k != "cuda"}
            if device.type == "cuda":
                rng["cuda"] = states[_index(device)]
        return pickle.dumps((move_batch(closure.batch, "cpu"), rng))
    except Exception as exc:
        return f"the batch could not be sent: {_said(exc)}"


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _rng_here(rng: dict[str, Any] | None, device: torch.device) -> dict[str, Any] | None:
    """Another rank's RNG state (from :func:`_pack`) for this rank: its device's CUDA generator state on
    this rank's ``device``, this rank's own on its other devices."""
    if rng is None or "cuda" not in rng:
        return rng
    state, rng = rng["cuda"], {k: v for k, v in rng.items() if k != "cuda"}
    if device.type == "cuda":
        states = torch.cuda.get_rng_state_all()  # type: ignore[no-untyped-call]
        states[_index(device)] = state
        rng["cuda"] = states
    return rng


def replay_batch_of(
    closure: Any,
    payload: bytes | str | None,
    replay: Callable[[Callable[[], Any], dict[str, Any] | None], dict[str, Any]],
    params: Sequence[Tensor],
    *,
    rank: int,
    of: int,
) -> dict[str, Any]:
    """The partner's replay of another rank's batch (``payload``, from :func:`_pack`): moved to this
    rank's device, run through ``closure.on(batch)`` with the other rank's RNG state. Never raises:
    whatever fails (the batch, the closure, the replay) is ``replay failed: <reason>``."""
    try:
        if not isinstance(payload, bytes):
            raise RuntimeError(payload or "no batch arrived")
        batch, rng = pickle.loads(payload)  # from a rank of this run, as every object collective's
        device = params[0].device if params else torch.device("cpu")
        out = replay(closure.on(move_batch(batch, device)), _rng_here(rng, device))
    except Exception as exc:  # a replay must never crash the run, nor leave the other ranks waiting
        error = f"{_said(exc)}"
        out = {"verdict": f"{FAILED}: {error}", "error": error, "replays": 0, **where_am_i(params)}
    return {**out, "rank": rank, "batch_of": of}


def conclude_cross(own: dict[str, Any], partner: dict[str, Any]) -> dict[str, Any]:
    """The verdict from the faulty rank's own replay of its batch (``own``) and the partner's: ``own``
    with that verdict, ``"cross"`` (``partner``), ``"reproduced_on"`` and, a ``device`` verdict only,
    ``"suspect"``. Where only the partner reproduced it, the forward origin is the partner's.

    =========================  =====================  =================================================
    partner                    faulty rank            verdict
    =========================  =====================  =================================================
    reproduced                 any                    the partner's (``data or numerics``, ``precision``)
    did not reproduce          reproduced             ``device: rank r (host, device)``, a ``suspect``
    failed                     reproduced             ``replay failed: rank p could not replay ...``
    did not reproduce, failed  did not, or failed     the faulty rank's own (``transient``, ``replay failed``)
    =========================  =====================  =================================================

    Example::

        >>> own = {"verdict": "data or numerics", "rank": 1, "host": "h", "device": "cuda:1", "device_name": "H100"}
        >>> out = conclude_cross(own, {"verdict": "transient", "rank": 2})
        >>> out["verdict"], out["suspect"]["device_name"], out["reproduced_on"]
        ('device: rank 1 (h, cuda:1)', 'H100', [1])
        >>> conclude_cross(own, {"verdict": "data or numerics", "rank": 2})["reproduced_on"]
        [1, 2]
    """
    r, p = own["rank"], partner["rank"]
    out = {**own, "cross": {**partner, "batch_of": r}}
    out["reproduced_on"] = [x["rank"] for x in (own, partner) if _reproduced(x)]
    if _reproduced(partner):
        where = ("forward_origin", "input_nonfinite", "loss_finite", "produced", "weights_nonfinite")
        if not _reproduced(own):
            for key in where:
                out.pop(key, None)
            out.update({k: partner[k] for k in where if k in partner})
        out["verdict"] = partner["verdict"]
    elif _reproduced(own) and partner["verdict"] == TRANSIENT:
        out["verdict"] = f"{DEVICE}: rank {r} ({own.get('host')}, {own.get('device')})"
        out["suspect"] = {k: own[k] for k in ("rank", "host", "device", "device_name")}
    elif _reproduced(own):
        reason = str(partner["verdict"]).removeprefix(f"{FAILED}: ")
        out["verdict"] = f"{FAILED}: rank {p} could not replay rank {r}'s batch: {reason}"
    else:
        out["verdict"] = own["verdict"]
    return out
