"""Per rank: what a data-parallel run's events say of each rank, its host and its device.

Two kinds of event name ranks:

* ``replica_divergence`` (:mod:`lightning_gradguard.core.replicas`): ``extra["ranks"]`` the odd ranks
  (by majority; with no majority, every rank of the group that disagrees), ``extra["devices"]`` each
  one's ``{"host", "device"}``;
* a replay's verdict on a ``nonfinite`` or ``spike_skipped`` event
  (:mod:`lightning_gradguard.core.attribution`), ``extra["replay"]``: ``faulty_ranks``, each rank's own
  replay (``ranks``), and for a ``device`` verdict the ``suspect``.

A *suspect device* is one the evidence points at: a rank that a divergence with a majority names, the
``suspect`` of a ``device`` verdict, a faulty rank of a ``transient`` verdict (the fault did not
reproduce: the hardware is suspected). A divergence without a majority suspects no one (no majority
tells which replica is wrong). Only a run of several processes has ranks to speak of: a
single-process replay (no gathered ``ranks``, no cross-rank replay) names none.

This module imports nothing but the standard library (the report imports no torch): the verdict
words ``TRANSIENT`` and ``DEVICE`` of :mod:`~lightning_gradguard.core.verdicts` are restated.

Example::

    >>> event = {"kind": "replica_divergence", "step": 7, "layers": ["fc"], "action": "warned",
    ...          "extra": {"ranks": [1], "apart": [0, 1, 2], "majority": True,
    ...                    "devices": {"0": {"host": "a", "device": "cuda:0"}, "1": {"host": "a", "device": "cuda:1"},
    ...                                "2": {"host": "b", "device": "cuda:0"}}}}
    >>> named_ranks(event)
    [{'rank': 1, 'host': 'a', 'device': 'cuda:1'}]
    >>> suspect_devices([event])
    [{'rank': 1, 'host': 'a', 'device': 'cuda:1', 'evidence': [{'step': 7, 'kind': 'replica_divergence'}]}]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DIVERGENCE", "named_ranks", "per_rank", "suspect_devices", "where"]

DIVERGENCE = "replica_divergence"
TRANSIENT, DEVICE = "transient", "device"  # as in core/verdicts.py


def _replay(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The event's replay when it was a run of several processes (gathered, or a cross-rank replay)."""
    replay = (event.get("extra") or {}).get("replay")
    if not isinstance(replay, dict) or not any(k in replay for k in ("ranks", "cross", "no_cross")):
        return None
    return replay


def _device_of(replay: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """A rank's host and device, from its own replay in the gathered ``ranks`` (else the result's own)."""
    for row in replay.get("ranks") or ():
        if isinstance(row, dict) and row.get("rank") == rank:
            return {"host": row.get("host"), "device": row.get("device")}
    if replay.get("rank") == rank:
        return {"host": replay.get("host"), "device": replay.get("device")}
    return {"host": None, "device": None}


def _is_device(verdict: str) -> bool:
    return verdict.startswith(f"{DEVICE}:")


def named_ranks(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ranks an event names, each ``{"rank", "host", "device"}`` (None where unknown): a divergence's
    odd ranks; a replay's suspect (a ``device`` verdict), else its faulty ranks; [] for any other event."""
    extra = event.get("extra") or {}
    if event.get("kind") == DIVERGENCE:
        devices = extra.get("devices") or {}
        return [{"rank": int(r), "host": (devices.get(str(r)) or {}).get("host"),
                 "device": (devices.get(str(r)) or {}).get("device")} for r in extra.get("ranks") or ()]  # fmt: skip
    replay = _replay(event)
    if replay is None:
        return []
    suspect = replay.get("suspect")
    if _is_device(str(replay.get("verdict", ""))) and isinstance(suspect, dict):
        return [{"rank": int(suspect["rank"]), "host": suspect.get("host"), "device": suspect.get("device")}]
    return [{"rank": int(r), **_device_of(replay, int(r))} for r in replay.get("faulty_ranks") or ()]


def where(row: Mapping[str, Any]) -> str:
    """``rank 1 (node-a, cuda:1)``: a rank with its host and device."""
    return f"rank {row['rank']} ({row.get('host') or 'host unknown'}, {row.get('device') or 'device unknown'})"


def suspect_devices(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The devices the run's events suspect (see the module's docstring), by rank: ``[{"rank", "host",
    "device", "evidence": [{"step", "kind"}, or with "verdict" for a replay]}]``, the evidence in step order."""
    found: dict[int, dict[str, Any]] = {}
    for e in events:
        step, kind = int(e["step"]), str(e.get("kind"))
        if kind == DIVERGENCE:
            if not (e.get("extra") or {}).get("majority"):
                continue
            rows, proof = named_ranks(e), {"step": step, "kind": kind}
        else:
            replay = _replay(e)
            verdict = str((replay or {}).get("verdict", ""))
            if replay is None or not (verdict == TRANSIENT or _is_device(verdict)):
                continue
            rows, proof = named_ranks(e), {"step": step, "kind": kind, "verdict": verdict}
        for row in rows:
            known = found.setdefault(row["rank"], {**row, "evidence": []})
            for key in ("host", "device"):
                known[key] = known[key] or row[key]
            if proof not in known["evidence"]:
                known["evidence"].append(proof)
    for known in found.values():
        known["evidence"].sort(key=lambda p: p["step"])
    return [found[r] for r in sorted(found)]


def per_rank(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the events say of each rank, ``{"<rank>": {"host", "device", "divergences", "replays"}}``
    (string keys, as JSON has them), ranks in order; {} for a single-process run.

    ``divergences``: each divergence that names the rank, ``{"step", "layers", "action", "majority"}``.
    ``replays``: each replay in which the rank was faulty, or its own replay reproduced the fault, or it
    is the suspect, ``{"step", "kind", "verdict", "faulty"}``: the rank's own replay's verdict (the run's
    verdict for a ``device`` suspect), and whether its own gradients or loss were non-finite; and the
    partner's replay of the faulty rank's batch (a cross-rank replay), with ``"batch_of"`` that rank.
    """
    out: dict[int, dict[str, Any]] = {}

    def entry(rank: int, host: Any, device: Any) -> dict[str, Any]:
        row = out.setdefault(rank, {"host": host, "device": device, "divergences": [], "replays": []})
        row["host"], row["device"] = row["host"] or host, row["device"] or device
        return row

    for e in events:
        extra = e.get("extra") or {}
        if e.get("kind") == DIVERGENCE:
            for r in named_ranks(e):
                entry(r["rank"], r["host"], r["device"])["divergences"].append(
                    {"step": int(e["step"]), "layers": list(extra.get("layers") or e.get("layers") or []),
                     "action": e.get("action"), "majority": bool(extra.get("majority"))})  # fmt: skip
            continue
        replay = _replay(e)
        if replay is None:
            continue
        faulty = {int(r) for r in replay.get("faulty_ranks") or ()}
        verdict = str(replay.get("verdict", ""))
        sus = replay.get("suspect") if _is_device(verdict) else None
        suspect = int(sus["rank"]) if isinstance(sus, dict) else None
        own = {int(row["rank"]): row for row in replay.get("ranks") or () if isinstance(row, dict) and "rank" in row}
        if not own and "rank" in replay:
            own = {int(replay["rank"]): replay}
        for rank in sorted(set(own) | faulty | ({suspect} if suspect is not None else set())):
            mine = own.get(rank, {})
            said = verdict if rank == suspect else str(mine.get("verdict", verdict))
            if rank not in faulty and rank != suspect and said == TRANSIENT:
                continue  # a healthy rank whose replay was as healthy: nothing to say of it
            place = _device_of(replay, rank)
            entry(rank, place["host"], place["device"])["replays"].append(
                {"step": int(e["step"]), "kind": e.get("kind"), "verdict": said, "faulty": rank in faulty})
        cross = replay.get("cross")
        if isinstance(cross, dict) and "rank" in cross:  # the partner's replay of the faulty rank's batch
            entry(int(cross["rank"]), cross.get("host"), cross.get("device"))["replays"].append(
                {"step": int(e["step"]), "kind": e.get("kind"), "verdict": str(cross.get("verdict")),
                 "faulty": int(cross["rank"]) in faulty, "batch_of": cross.get("batch_of")})  # fmt: skip
    return {str(r): out[r] for r in sorted(out)}
