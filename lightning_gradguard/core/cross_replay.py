"""Which device? A fault on one rank replayed on another (under data parallelism).

When a step's fault is on one rank (the DDP communication hook keeps each rank's own), every rank's own
replay (:func:`~lightning_gradguard.core.attribution.attribute`) is gathered, and the first faulty
rank sends its batch, with its RNG state, to a partner, the next rank that is not itself faulty, which
replays it from its own (identical) weights (:func:`replay_across`). It reproduces on the partner:
``data or numerics`` (or the partner's ``precision``); only on the faulty rank: ``device: rank r
(host, device)``, with a ``suspect``; nowhere: ``transient`` (:func:`conclude_cross`). A replay that
raises on the partner is ``replay failed: rank p could not replay rank r's batch: <reason>``. Every rank
takes part in each collective of the exchange, in the same order, on a group of its own whose
collectives time out after :data:`EXCHANGE_TIMEOUT_S` (:func:`exchange_group`). It needs a closure that
can take another batch (:class:`ReplayClosure`); a plain closure gets no cross-rank replay, and the event
says so.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.core.verdicts import DEVICE, FAILED, TRANSIENT, said, where_am_i
from lightning_gradguard.core.verdicts import reproduced as _reproduced

__all__ = [
    "EXCHANGE_TIMEOUT_S", "ReplayClosure", "conclude_cross", "exchange_group", "gather_verdicts", "move_batch",
    "plan_cross_replay", "replay_across", "replay_batch_of",
]  # fmt: skip

# Every collective of a cross-rank replay's exchange (the ranks' own verdicts, the batch, the partner's
# verdict) gives up after this long: the slowest rank's own replays (up to three forward and backward
# passes of one step), then the partner's. A rank whose collective times out reports ``replay failed``
# and goes on.
EXCHANGE_TIMEOUT_S = 300.0


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
        why = f"the exchange failed: {said(exc)}"
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
        why = f"{FAILED}: the exchange failed: {said(exc)}"
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
        return f"the batch could not be sent: {said(exc)}"


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
        error = f"{said(exc)}"
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
