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

**Which device?** Under data parallelism the first faulty rank's batch is replayed on a partner rank
too (:mod:`.cross_replay`): the verdict then says whether the device or the batch made the fault.

A finite spike (``spike_skipped``) is reproduced by a replay whose total gradient norm is at least
:data:`SPIKE_REPRODUCED` (half) of the step's (``grad_norms`` beside ``spike_norm`` in the result).

Healthy steps pay only for keeping a reference to the batch and the RNG state before the forward
pass (``capture_rng``: a few kilobytes copied on the host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.core.cross_replay import exchange_group, gather_verdicts, replay_across
from lightning_gradguard.core.verdicts import DATA, DEVICE, FAILED, PRECISION, TRANSIENT, VERDICTS, said, where_am_i
from lightning_gradguard.core.verdicts import reproduced as _reproduced
from lightning_gradguard.dump import capture_rng, restore_rng
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.layout import strip_wrappers

__all__ = [
    "DATA", "DEVICE", "FAILED", "PRECISION", "SPIKE_REPRODUCED", "TRANSIENT", "VERDICTS", "Replay",
    "ReplayAttribution", "attribute", "describe", "keep_attributes", "replay_once", "replaying_from", "where_am_i",
]  # fmt: skip

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
        found.error = said(exc)
    finally:
        restore_rng(saved)
    return found


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
    partner rank too (:func:`~.cross_replay.replay_across`), on a process group of the component's own,
    created at ``setup`` (a collective of every rank), whose collectives time out after
    :data:`~.cross_replay.EXCHANGE_TIMEOUT_S`.

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
