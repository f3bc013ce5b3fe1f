"""``gradguard check PATH...``: is a checkpoint safe to resume from?

Reads each PATH, a Lightning checkpoint, a plain ``torch.save`` file (a state dict or any nest of
dicts and lists of tensors) or a distributed checkpoint's directory (``torch.distributed.checkpoint``,
as FSDP2 and ``ModelParallelStrategy`` write it, with Lightning's ``meta.pt`` beside the shards), and
says for each:

* the non-finite tensors, by name and with their counts (model weights, optimizer state, ...);
* the health record the checkpoint gate wrote into it (step, healthy or not and why, the last
  rollback, the guard's version), when it has one;
* whether the gate quarantined it after a rollback (the index ``gradguard_checkpoints.json`` beside it,
  or the quarantine suffix in its name).

Exit status: 0 when every checkpoint is healthy, 1 when one is not (non-finite values, marked
unhealthy, or quarantined), 2 when one cannot be read or for usage errors. A relaunch script can gate
on it::

    gradguard check checkpoints/last.ckpt || exit 1
    gradguard check checkpoints/ --json       # every checkpoint in a directory

Checkpoints are loaded as the trainer loads them, with ``torch.load``: tensors only
(``weights_only=True``) where that reads the file, else in full, as a trusted file (Lightning
checkpoints hold hyperparameters). Check only files you would resume from anyway.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_gradguard.core.checkpoints import HEALTH_KEY, INDEX_FILE, Checkpoints, flat_tensors, nonfinite_tensors
from lightning_gradguard.primitives.text import plural

__all__ = ["check_checkpoint", "checkpoint_paths", "main"]

_DCP_METADATA = ".metadata"  # what makes a directory a distributed checkpoint
_LIGHTNING_META = "meta.pt"  # Lightning's non-tensor state beside a distributed checkpoint's shards
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckError(Exception):
    """A checkpoint that cannot be read."""


def checkpoint_paths(path: Path) -> Iterator[Path]:
    """``path`` itself, or, for a directory that is not a distributed checkpoint, each checkpoint in it
    (files ending .ckpt, .pt, .pth, .bin or the quarantine suffix, and distributed checkpoints)."""
    if not path.is_dir() or (path / _DCP_METADATA).exists():
        yield path
        return
    quarantined = Checkpoints().suffix
    for child in sorted(path.iterdir()):
        name = child.name.removesuffix(quarantined)
        if (child / _DCP_METADATA).exists() or (child.is_file() and name.endswith(_CHECKPOINT_SUFFIXES)):
            yield child


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckError(f"cannot be read: {type(exc).__name__}: {exc}") from None


def _load_distributed(path: Path) -> dict[str, Any]:
    """A distributed checkpoint's tensors, gathered on the host (one process, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(path, full)
        except Exception as exc:
            raise CheckError(f"cannot be read as a distributed checkpoint: {type(exc).__name__}: {exc}") from None
        state = _load(full)
    meta = path / _LIGHTNING_META
    if meta.exists():
        extra = _load(meta)
        if isinstance(extra, Mapping):
            state = {**extra, **state}
    return dict(state) if isinstance(state, Mapping) else {"": state}


def _quarantine_note(path: Path) -> str | None:
    """Why the gate's index (or the file's name) says ``path`` was quarantined, or None."""
    name = path.name
    try:
        index = json.loads((path.parent / INDEX_FILE).read_text())
    except (OSError, ValueError):
        index = {}
    for row in index.get("checkpoints", []):
        if row.get("quarantined") and name in (row.get("quarantined_as"), Path(str(row.get("path"))).name):
            return f"quarantined after a rollback (it holds updates the rollback undid, step {row.get('step')})"
    if name.endswith(Checkpoints().suffix):
        return "quarantined after a rollback (its name carries the quarantine suffix)"
    return None


def check_checkpoint(path: Path) -> dict[str, Any]:
    """What :mod:`gradguard check <lightning_gradguard.cli.check>` says of one checkpoint, as a dict:
    ``path``, ``format`` (``lightning``, ``state_dict``, ``distributed``), ``healthy``, ``nonfinite``
    (``[{"name", "count"}]``), ``tensors`` (how many were checked), ``health`` (the record, or None),
    ``problems`` (each reason it is unhealthy), ``step``.

    Raises:
        CheckError: the checkpoint cannot be read.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "model.pt"
        ...     torch.save({"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}, path)
        ...     result = check_checkpoint(path)
        >>> result["healthy"], result["nonfinite"], result["problems"]
        (False, [{'name': 'w', 'count': 1}], ['non-finite values in w (1)'])
    """
    if not path.exists():
        raise CheckError("does not exist")
    distributed = path.is_dir()
    if distributed and not (path / _DCP_METADATA).exists():
        raise CheckError(f"is a directory without {_DCP_METADATA}: not a distributed checkpoint")
    state = _load_distributed(path) if distributed else _load(path)
    lightning = isinstance(state, Mapping) and "state_dict" in state and ("global_step" in state or distributed)
    if isinstance(state, Mapping) and "state_dict" in state:  # the model and optimizers; not callbacks' state
        tensor_keys = [k for k in state if k in ("state_dict", "optimizer_states") or str(k).startswith("optimizer_")]
        named = list(flat_tensors({k: state[k] for k in tensor_keys}))
    else:
        named = list(flat_tensors(state))
    bad = nonfinite_tensors(named)
    record = state.get(HEALTH_KEY) if isinstance(state, Mapping) else None
    problems = []
    if bad:
        shown = ", ".join(f"{name} ({count})" for name, count in bad[:5])
        more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
        problems.append(f"non-finite values in {shown}{more}")
    if isinstance(record, Mapping) and record.get("healthy") is False:
        problems.append(f"marked unhealthy when saved ({'; '.join(record.get('why') or []) or 'no reason given'})")
    quarantine = _quarantine_note(path)
    if quarantine is not None:
        problems.append(quarantine)
    step = state.get("global_step") if isinstance(state, Mapping) else None
    if step is None and isinstance(record, Mapping):
        step = record.get("step")
    return {
        "path": str(path),
        "format": "distributed" if distributed else ("lightning" if lightning else "state_dict"),
        "healthy": not problems,
        "step": step,
        "tensors": sum(1 for _, t in named if isinstance(t, torch.Tensor)),
        "nonfinite": [{"name": name, "count": count} for name, count in bad],
        "health": dict(record) if isinstance(record, Mapping) else None,
        "problems": problems,
    }


def render(result: dict[str, Any]) -> str:
    """One checkpoint's answer in a line (two when it has a health record)."""
    name = result["path"]
    if "unreadable" in result:
        return f"{name}: UNREADABLE: {result['unreadable']}"
    where = f"{result['format']} checkpoint" + (f", step {result['step']}" if result["step"] is not None else "")
    head = f"{name}: " + ("healthy" if result["healthy"] else "UNHEALTHY: " + "; ".join(result["problems"]))
    line = f"{head} ({where}, {plural(result['tensors'], 'tensor')} checked)"
    record = result["health"]
    if record is None:
        return line + "; no health record (not saved under the checkpoint gate)"
    rollback = record.get("last_rollback")
    after = (f", after the rollback from step {rollback['from_step']} to step {rollback['snapshot_step']}"
             if rollback else "")  # fmt: skip
    said = "healthy" if record.get("healthy") else "unhealthy"
    return f"{line}\n  health record: {said} at step {record.get('step')}{after}, GradGuard {record.get('version')}"


def main(paths: list[Path], as_json: bool) -> int:
    """Check every checkpoint under ``paths``; print; the exit status (module docstring)."""
    results: list[dict[str, Any]] = []
    for given in paths:
        if not given.exists():
            results.append({"path": str(given), "unreadable": "does not exist"})
            continue
        found = list(checkpoint_paths(given))
        if not found:
            results.append({"path": str(given), "unreadable": "a directory without checkpoints"})
        for path in found:
            try:
                results.append(check_checkpoint(path))
            except CheckError as exc:
                results.append({"path": str(path), "unreadable": str(exc)})
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print("\n".join(render(r) for r in results))
    if any("unreadable" in r for r in results):
        return 2
    return 0 if all(r["healthy"] for r in results) else 1
