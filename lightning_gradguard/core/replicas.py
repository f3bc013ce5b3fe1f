"""Replicas that agree: a bit-exact check that data-parallel replicas hold the same weights.

Under data parallelism every replica must hold bit-identical weights after every step. Silent data
corruption (a faulty device returning wrong *finite* values), a non-deterministic kernel, or a rank
that skipped a step alone makes them drift apart, and nothing notices until the loss does.

:class:`ReplicaCheck` is the guard's ``replicas`` component (option :class:`Replicas`). On check steps
(every logging step by default) each rank computes, on the device, a checksum of each layer's
parameters: the bits of every element viewed as integers (int32 words; int16 for 2-byte dtypes),
summed modulo 2**32. Any single flipped bit changes it. The checksums travel with the step's flags,
in the same one collective and the same one read: each rank writes its own row of a ``world x slots``
table that the flags' sum across ranks fills in (a sum of rows that are zero but one is a gather),
each 32-bit checksum as two 16-bit halves, exact in float32. Steps that are not check steps add
nothing.

After the read every rank holds every rank's checksums and takes the same decision. Ranks that must
agree are grouped per tensor: under DDP every rank; for a DTensor the ranks that hold the same
shard, that is, that differ only along its ``Replicate`` mesh dimensions (HSDP's replicate dimension,
a tensor-parallel plan's replicated parameters). FSDP2 and tensor-parallel shards have no replica,
and FSDP1's flat shards are not DTensors: where no tensor has a replica the check says so once and
costs nothing. On a mismatch a ``replica_divergence`` event names the odd ranks (by majority when a
group has 3 or more replicas; with 2, both, as no majority can tell which is wrong), their hosts and
devices, and the layers that differ; then the action:

``"warn"``      the event only;
``"repair"``    broadcast the parameters and the optimizer state from the smallest majority rank to every
                rank (DDP), then verify that the replicas agree again (the event says whether they do);
``"rollback"``  ask the ``recovery`` component for a rollback (needs ``rollback=Rollback(...)``): every
                rank restores its own snapshot; a snapshot taken after the corruption holds it too,
                so keep ``every`` of the check at most the snapshots' ``every``;
``"stop"``      stop the run (``report.should_stop``) after the event.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
from lightning_gradguard.core.verdicts import where_am_i
from lightning_gradguard.errors import warn
from lightning_gradguard.events import GradEvent
from lightning_gradguard.primitives.text import plural

__all__ = ["ACTIONS", "ReplicaCheck", "Replicas", "checksum", "checksums"]

ACTIONS = ("warn", "repair", "rollback", "stop")
_HALF = 1 << 16
_MOD = 1 << 32


@dataclass(frozen=True)
class Replicas:
    """The replica check (``GuardCore(replicas=...)``; None, the default, turns it off).

    Args:
        every: check every this many steps (an int >= 1), or None (default): on every logging step.
        action: on a divergence, ``"warn"`` (default), ``"repair"``, ``"rollback"`` (needs the
            ``rollback`` option) or ``"stop"`` (see the module's docstring).

    Raises:
        ValueError: an argument is out of range; the message names it.

    Example::

        >>> Replicas(action="repair").every is None
        True
        >>> Replicas(action="fix")
        Traceback (most recent call last):
        ...
        ValueError: Expected `action` to be one of 'warn', 'repair', 'rollback', 'stop', but got 'fix'.
    """

    every: int | None = None
    action: Literal["warn", "repair", "rollback", "stop"] = "warn"

    def __post_init__(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):  # fmt: skip
            raise ValueError(f"Expected `every` to be an int >= 1 or None, but got {self.every!r}.")
        if self.action not in ACTIONS:
            raise ValueError(
                f"Expected `action` to be one of {', '.join(repr(a) for a in ACTIONS)}, but got {self.action!r}."
            )


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach()


def _words(t: Tensor) -> Tensor:
    """``t``'s bits as integers: int32 words (int16 for a 2-byte dtype, uint8 for a 1-byte one)."""
    flat = t.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    size = flat.element_size()
    if size == 1 or flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    if size == 2:
        return flat.view(torch.int16)
    return flat.view(torch.int32)  # 4-byte dtypes; 8-byte ones (float64) as two words each


def checksum(t: Tensor) -> Tensor:
    """The bits of ``t`` summed as integers, modulo 2**32 (a 0-d int64 tensor on ``t``'s device).

    A single flipped bit changes it: the flip changes one word by ±2**b, b < 32.

    Example::

        >>> w = torch.tensor([1.0, -2.5, 3.25])
        >>> bad = w.clone(); bad.view(torch.int32)[1] ^= 1      # one mantissa bit
        >>> int(checksum(w)) == int(checksum(w.clone())), int(checksum(w)) == int(checksum(bad))
        (True, False)
    """
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    return torch.remainder(_words(t).sum(dtype=torch.int64), _MOD)


def checksums(tensors: Sequence[Tensor], slot_of: Sequence[int], slots: int, device: torch.device) -> Tensor:
    """Each slot's checksum (the sum of its tensors' checksums, modulo 2**32), as ``[slots, 2]`` float32
    halves (high, low 16 bits: exact in float32). One small kernel per tensor: check steps only."""
    sums = torch.zeros(slots, dtype=torch.int64, device=device)
    if tensors:
        each = torch.stack([checksum(_local(t)).to(device) for t in tensors])
        sums.index_add_(0, torch.tensor(list(slot_of), dtype=torch.int64, device=device), each)
    sums = torch.remainder(sums, _MOD)
    return torch.stack([torch.div(sums, _HALF, rounding_mode="floor"), torch.remainder(sums, _HALF)], dim=1).float()


@dataclass
class _Slot:
    """What one checksum covers: a layer's replicated tensors (or one DTensor), and who must agree."""

    layer: str
    tensors: list[int]  # indices into the layout's parameters
    groups: list[list[int]]  # the ranks that must hold the same bits, each group sorted


def _replica_groups(t: Tensor, world: int) -> list[list[int]] | None:
    """The groups of global ranks that hold the same bits of ``t``: every rank for a plain tensor (DDP),
    the ranks that differ only along Replicate mesh dimensions for a DTensor; None when no rank has a
    replica (a shard on every rank)."""
    mesh = getattr(t, "device_mesh", None)
    placements = getattr(t, "placements", None)
    if mesh is None or placements is None:
        return [list(range(world))] if world > 1 else None
    layout = mesh.mesh  # global ranks, shaped like the mesh
    keep = [d for d, p in enumerate(placements) if not p.is_replicate()]
    groups: dict[tuple[int, ...], list[int]] = {}
    for coords in torch.cartesian_prod(*[torch.arange(n) for n in layout.shape]).reshape(-1, layout.dim()).tolist():
        key = tuple(coords[d] for d in keep)
        groups.setdefault(key, []).append(int(layout[tuple(coords)]))
    out = [sorted(g) for g in groups.values() if len(g) > 1]
    return out or None


class ReplicaCheck(GuardComponent):
    """The guard's ``replicas`` component (see the module's docstring).

    Args:
        options: the :class:`Replicas` option.
    """

    name = "replicas"
    order = 70  # settles before the recovery component (80), which takes its rollback request

    def __init__(self, options: Replicas | None = None) -> None:
        self.options = options or Replicas()
        self.rank = 0
        self.world = 1
        self.sharded = False
        self.record: Any = None
        self.devices: dict[int, dict[str, str]] = {}  # rank -> {"host", "device", "device_name"}
        self.divergences = 0  # checks that found replicas apart
        self.repairs = 0
        self.checks = 0
        self._slots: dict[int, list[_Slot]] = {}  # per optimizer layout (by id), built once
        self._off: str | None = None  # why the check cannot apply, said once
        self._said = False

    # ------------------------------------------------------------------ the run
    def setup(self, setup: Setup) -> None:
        self.rank, self.world, self.sharded, self.record = setup.rank, setup.world_size, setup.sharded, setup.record
        if self.world <= 1:
            self._off = "one process: nothing to compare"
            return
        first = next(iter(setup.model.parameters()), None) if setup.model is not None else None
        me = {k: v for k, v in where_am_i([_local(first)] if first is not None else []).items() if k != "rank"}
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() == self.world:
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, me)  # a collective: every rank sets up together
            self.devices = {r: d for r, d in enumerate(everyone)}
        else:
            self.devices = {self.rank: me}

    def _layout_slots(self, ctx: StepContext) -> list[_Slot]:
        layout = ctx.layout
        slots = self._slots.get(id(layout))
        if slots is not None:
            return slots
        plain: dict[int, list[int]] = {}  # layer -> its replicated plain tensors
        slots = []
        for i, p in enumerate(layout.params):
            if getattr(p, "device_mesh", None) is None and self.sharded:
                continue  # FSDP1's flat shards: not DTensors, no replica to find
            groups = _replica_groups(p, self.world)
            if groups is None:
                continue
            if getattr(p, "device_mesh", None) is None:
                plain.setdefault(layout.param_layer[i], []).append(i)
            else:
                slots.append(_Slot(layout.layer_names[layout.param_layer[i]], [i], groups))
        everyone = [list(range(self.world))]
        slots = [_Slot(layout.layer_names[layer], ids, everyone) for layer, ids in plain.items()] + slots
        self._slots[id(layout)] = slots
        if not slots and not self._said:
            self._said = True
            self._off = ("no parameter has a replica: every one is a shard (FSDP2 or tensor parallelism without a "
                         "replicate dimension, or FSDP1's flat shards)")  # fmt: skip
            if self.rank == 0:
                warn(f"GradGuard(replicas=...): the replica check cannot apply here: {self._off}.")
        return slots

    def due(self, ctx: StepContext) -> bool:
        every = self.options.every
        return ctx.logging if every is None else (ctx.number + 1) % every == 0

    # ------------------------------------------------------------------ a step
    def register(self, ctx: StepContext) -> None:
        if self.world <= 1 or not self.due(ctx) or ctx.measurement is None:
            return
        slots = self._layout_slots(ctx)
        if not slots:
            return
        device = ctx.measurement.zero.device
        tensors = [ctx.layout.params[i] for s in slots for i in s.tensors]
        slot_of = [k for k, s in enumerate(slots) for _ in s.tensors]
        mine = checksums(tensors, slot_of, len(slots), device)
        table = torch.zeros(self.world, len(slots), 2, device=device)
        table[self.rank] = mine
        ctx.reduced("replicas", table.reshape(-1))  # summed with the flags: every rank's row, on every rank
        ctx.extra["replicas"] = slots

    def settle(self, ctx: StepContext) -> None:
        slots = ctx.extra.get("replicas")
        if slots is None or "replicas" not in ctx.read:
            return
        self.checks += 1
        values = ctx.read.vector("replicas")
        n = len(slots)
        sums = [[int(values[(r * n + k) * 2]) * _HALF + int(values[(r * n + k) * 2 + 1]) for k in range(n)]
                for r in range(self.world)]  # fmt: skip
        odd, apart, layers, majority = _vote(slots, sums)
        if not apart:
            return
        self.divergences += 1
        event = self._event(ctx, odd, apart, layers, majority)
        action = self.options.action
        if action == "repair":
            if any(getattr(ctx.layout.params[i], "device_mesh", None) is not None for s in slots for i in s.tensors):
                event = _amend(event, "repair is for DDP replicas; this run's DTensor replicas were not repaired",
                               action="warned", repaired=False)  # fmt: skip
            else:
                source = min(r for r in range(self.world) if r not in odd) if majority else 0
                agree = self.repair(ctx, source, slots)
                self.repairs += 1
                said = (f"repaired from rank {source}: the replicas agree again" if agree
                        else f"repaired from rank {source}, but the replicas still differ")  # fmt: skip
                event = _amend(event, said, action="repaired", repaired=agree, source=source)
        elif action == "rollback":
            ctx.request_rollback(f"replicas diverged at step {ctx.number} ({_ranks_text(odd, majority)})")
            event = _amend(event, "a rollback follows", action="rollback requested")
        elif action == "stop":
            if ctx.report is not None:
                ctx.report.should_stop = True
            event = _amend(event, "the run stops", action="stopped")
        ctx.record(event)

    # ------------------------------------------------------------------ acting
    def repair(self, ctx: StepContext, source: int, slots: Sequence[_Slot]) -> bool:
        """Broadcast the optimizer's parameters and their state from ``source`` to every rank (a
        collective, in the same order on every rank), then check the replicas again; whether they agree."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in ctx.layout.params:
                _broadcast(p.data, source)
                state = ctx.optimizer.state.get(p, {})
                for key in sorted(state, key=str):
                    if isinstance(state[key], Tensor):
                        _broadcast(state[key], source)
        tensors = [ctx.layout.params[i] for s in slots for i in s.tensors]
        slot_of = [k for k, s in enumerate(slots) for _ in s.tensors]
        device = tensors[0].device if tensors else torch.device("cpu")
        mine = checksums(tensors, slot_of, len(slots), device)
        table = torch.zeros(self.world, len(slots), 2, device=device)
        table[self.rank] = mine
        dist.all_reduce(table)
        return bool((table == table[0]).all())

    def _event(self, ctx: StepContext, odd: list[int], apart: list[int], layers: list[str],
               majority: bool) -> GradEvent:  # fmt: skip
        who = ", ".join(f"rank {r} ({self._device_text(r)})" for r in odd)
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        if majority:
            head = f"{who} {'differs' if len(odd) == 1 else 'differ'} from the majority of the replicas"
        else:
            head = f"the replicas on {who} differ, and no majority tells which is right"
        message = (f"GradGuard: replicas diverged at step {ctx.number}: {head}, in "
                   f"{plural(len(layers), 'layer')}: {shown}.")  # fmt: skip
        return GradEvent("replica_divergence", step=ctx.number, layers=tuple(layers), message=message, action="warned",
                         extra={"ranks": odd, "apart": apart, "majority": majority, "layers": layers,
                                "devices": {str(r): self.devices.get(r, {}) for r in apart},
                                "world_size": self.world})  # fmt: skip

    def _device_text(self, rank: int) -> str:
        d = self.devices.get(rank)
        return f"{d['host']}, {d['device']}" if d else "host unknown"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"checks": self.checks, "divergences": self.divergences, "repairs": self.repairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = int(state.get("checks", 0))
        self.divergences = int(state.get("divergences", 0))
        self.repairs = int(state.get("repairs", 0))

    def config(self) -> dict[str, Any]:
        return {"replicas": dataclasses.asdict(self.options)}


def _vote(slots: Sequence[_Slot], sums: list[list[int]]) -> tuple[list[int], list[int], list[str], bool]:
    """(the odd ranks, every rank in a group that disagrees, the layers that differ, whether every such
    group had a majority) from the gathered checksums ``sums[rank][slot]``."""
    odd: set[int] = set()
    apart: set[int] = set()
    layers: list[str] = []
    majority = True
    for k, slot in enumerate(slots):
        for group in slot.groups:
            values = Counter(sums[r][k] for r in group)
            if len(values) == 1:
                continue
            apart.update(group)
            if slot.layer not in layers:
                layers.append(slot.layer)
            value, count = values.most_common(1)[0]
            if count * 2 > len(group):
                odd.update(r for r in group if sums[r][k] != value)
            else:
                majority = False
                odd.update(group)
    return sorted(odd), sorted(apart), layers, majority


def _ranks_text(odd: Sequence[int], majority: bool) -> str:
    ranks = ", ".join(str(r) for r in odd)
    return f"odd rank{'s' if len(odd) > 1 else ''} {ranks}" if majority else f"ranks {ranks} disagree"


def _amend(event: GradEvent, said: str, *, action: str, **extra: Any) -> GradEvent:
    return dataclasses.replace(event, message=f"{event.message.rstrip('.')}; {said}.", action=action,
                               extra={**event.extra, **extra})  # fmt: skip


def _broadcast(t: Tensor, source: int) -> None:
    """Broadcast ``t`` in place from ``source`` (through the device for NCCL when ``t`` is on the host)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and not t.is_cuda:
        staged = t.cuda()
        dist.broadcast(staged, source)
        t.copy_(staged)
    else:
        dist.broadcast(t, source)
