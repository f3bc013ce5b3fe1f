"""Reading a run's event files from disk into a :class:`~lightning_gradguard.health.judge.RunData`,
with CRC checks (``gradguard report`` uses it; the tab reads through TensorBoard's data provider)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_gradguard.health.judge import ReportError, RunData
from lightning_gradguard.tensorboard.format import RunDecoder

__all__ = ["find_runs", "read_run"]


def find_runs(logdir: Path) -> list[Path]:
    """Every folder under ``logdir`` (itself included) that holds TensorBoard event files."""
    if not logdir.exists():
        raise ReportError(f"no such directory: {logdir}")
    if not logdir.is_dir():
        raise ReportError(f"not a directory: {logdir}")
    runs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*") if p.is_file()})
    if not runs:
        raise ReportError(f"no TensorBoard event files under {logdir}")
    return runs


def _check_files(run: Path) -> None:
    """Read every event file once, with CRC checks: a corrupt or truncated file is a usage error."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    for path in sorted(run.glob("events.out.tfevents.*")):
        if path.stat().st_size == 0:
            continue
        reader = PyRecordReader_New(os.fspath(path))
        count = 0
        while True:
            try:
                reader.GetNext()
            except Exception as exc:
                name = type(exc).__name__
                if name == "OutOfRangeError":
                    break
                raise ReportError(f"corrupt or truncated event file {path}: {name}: {str(exc).strip()[:120]}") from None
            try:
                event_pb2.Event.FromString(reader.record())
            except Exception:
                raise ReportError(f"corrupt event file {path}: record {count} is not a TensorBoard event") from None
            count += 1
        if count == 0:
            raise ReportError(f"corrupt event file {path}: no readable record")


def read_run(run: Path) -> RunData:
    """Read one run's guard data from its event files (CRC-checked)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    _check_files(run)
    acc = EventAccumulator(os.fspath(run), size_guidance={"scalars": 0, "tensors": 0, "images": 1, "histograms": 1})
    try:
        acc.Reload()
    except Exception as exc:
        raise ReportError(f"cannot read the event files in {run}: {type(exc).__name__}: {exc}") from None
    decoder = RunDecoder()
    for tag in acc.Tags().get("scalars", []):
        for ev in acc.Scalars(tag):
            decoder.add_scalar(tag, ev.step, ev.value)
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith("gradguard/"):
            for ev in acc.Tensors(tag):
                decoder.add_tensor(tag, ev.step, tensor_util.make_ndarray(ev.tensor_proto))
    return decoder.finish()
