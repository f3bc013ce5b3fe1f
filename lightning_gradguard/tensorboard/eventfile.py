"""Reading a run's event files from disk into a :class:`~lightning_gradguard.health.judge.RunData`,
with CRC checks (``gradguard report`` uses it; the tab reads through TensorBoard's data provider)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

from lightning_gradguard.health.judge import ReportError, RunData
from lightning_gradguard.tensorboard.format import RunDecoder

__all__ = ["RunReader", "find_runs", "masked_crc32c", "read_run"]


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


_HEADER = struct.Struct("<QI")  # a record: length (u64), masked CRC-32C of the length, data, masked CRC of the data


def _crc_table() -> Any:
    import numpy as np

    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # CRC-32C (Castagnoli), reflected
        table[i] = crc
    return table


def masked_crc32c(rows: Any) -> Any:
    """The masked CRC-32C (as TFRecord files store it) of each row of a 2-D uint8 array, vectorized:
    one table lookup per byte *position*, over every row at once.

    Example::

        >>> import numpy as np
        >>> from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as one_by_one
        >>> rows = np.frombuffer(b"gradguardGRADGUARD", dtype=np.uint8).reshape(2, 9)
        >>> [int(c) for c in masked_crc32c(rows)] == [one_by_one(b"gradguard"), one_by_one(b"GRADGUARD")]
        True
    """
    import numpy as np

    flat = np.ascontiguousarray(rows).reshape(-1)
    return _masked_crcs(flat, np.arange(rows.shape[0], dtype=np.int64) * rows.shape[1], rows.shape[1])


_TABLE: list[Any] = []


def _records(
    path: Path, data: bytes, start: int = 0, strict: bool = True, check: bool = True
) -> tuple[list[bytes], int]:
    """The records of one event file from byte ``start`` on, and where they end; each length and data
    checked against its CRC (vectorized) when ``check``.

    ``strict`` (``gradguard report``): a truncated record is an error. Otherwise (the tab, on a file
    still being written) reading stops before it, to be read when it is whole.

    Raises:
        ReportError: the file is truncated (``strict``), or a CRC does not match (corrupt).
    """
    import numpy as np

    starts: list[int] = []
    lengths: list[int] = []
    pos, size = start, len(data)
    unpack, begin, record = _HEADER.unpack_from, starts.append, lengths.append  # the loop runs per record
    while pos < size:
        if pos + 12 > size:
            if not strict:
                break
            raise ReportError(f"truncated event file {path}: a record header is cut at byte {pos}")
        length, crc = unpack(data, pos)
        if pos + 16 + length > size:  # a cut file, or a length that is garbage: its CRC tells which
            header = np.frombuffer(data, dtype=np.uint8, count=8, offset=pos).reshape(1, 8)
            if int(masked_crc32c(header)[0]) != crc:
                raise ReportError(f"corrupt event file {path}: record {len(starts)} has a corrupt length")
            if not strict:
                break
            raise ReportError(f"truncated event file {path}: record {len(starts)} is cut at byte {pos}")
        begin(pos)
        record(length)
        pos += 16 + length
    if strict and not starts and start == 0:
        raise ReportError(f"corrupt event file {path}: no readable record")
    if check and starts:
        _check_crcs(path, data, starts, lengths)
    return [data[p + 12 : p + 12 + n] for p, n in zip(starts, lengths, strict=True)], pos


def _check_crcs(path: Path, data: bytes, starts: list[int], lengths: list[int]) -> None:
    import numpy as np

    buf = np.frombuffer(data, dtype=np.uint8)
    at = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)
    if not np.array_equal(_masked_crcs(buf, at, 8), _u32(buf, at + 8)):
        raise ReportError(f"corrupt event file {path}: a record's length does not match its CRC")
    for length in np.unique(lens):  # records of one length at a time: one vectorized pass each
        sel = at[lens == length] + 12
        if not np.array_equal(_masked_crcs(buf, sel, int(length)), _u32(buf, sel + length)):
            raise ReportError(f"corrupt event file {path}: a record's data does not match its CRC")


def _masked_crcs(buf: Any, starts: Any, length: int) -> Any:
    """:func:`masked_crc32c` of ``buf[s : s + length]`` for every ``s`` in ``starts``, gathering one
    byte column at a time (no ``len(starts) x length`` copy)."""
    import numpy as np

    if not _TABLE:
        _TABLE.append(_crc_table())
    table = _TABLE[0]
    crc = np.full(len(starts), 0xFFFFFFFF, dtype=np.uint32)
    eight = np.uint32(8)
    for j in range(length):
        crc = table[(crc ^ buf[starts + j]) & 0xFF] ^ (crc >> eight)
    crc ^= np.uint32(0xFFFFFFFF)
    return (((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)).astype(np.uint32)


def _u32(buf: Any, at: Any) -> Any:
    import numpy as np

    b = buf[at[:, None] + np.arange(4)].astype(np.uint32)
    return (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)).astype(np.uint32)


def read_run(run: Path) -> RunData:
    """Read one run's guard data from its event files: one pass per file, CRC-checked, decoding only
    the guard's summaries (``gradguard/`` scalars, the tab's tensors and texts). Needs neither torch
    nor Lightning.

    Raises:
        ReportError: an event file is corrupt or truncated.
    """
    return RunReader(run).read()


class RunReader:
    """A run's event files, read incrementally: each :meth:`read` parses only the records written
    since the last one (the tab keeps one per run, so that a growing run is never read twice).

    Args:
        run: the run's folder.
        strict: a truncated record is an error (``gradguard report``); otherwise reading stops
            before it and takes it up when it is whole (a file still being written).
        check: check every record's CRCs.
    """

    def __init__(self, run: Path, strict: bool = True, check: bool = True) -> None:
        self.run = run
        self.strict = strict
        self.check = check
        self._offsets: dict[Path, int] = {}
        self._scalars: dict[str, list[tuple[int, float]]] = {}
        self._tensors: list[tuple[str, int, Any]] = []
        self._lock = threading.Lock()
        self._built: RunData | None = None

    def read(self) -> RunData:
        """The run's data, including what was appended since the last read.

        Raises:
            ReportError: an event file is corrupt (or truncated, when ``strict``).
        """
        with self._lock:
            grew = False
            for path in sorted(self.run.glob("events.out.tfevents.*")):
                if path.stat().st_size > self._offsets.get(path, 0):
                    before = self._offsets.get(path, 0)
                    self._read_file(path)
                    grew = grew or self._offsets[path] > before
            if not grew and self._built is not None:
                return self._built  # nothing new: the same data (callers cache what they derive from it)
            decoder = RunDecoder()
            for tag, step, value in self._tensors:
                decoder.add_tensor(tag, step, value)
            for tag, points in self._scalars.items():
                decoder.add_scalars(tag, points)
            self._built = decoder.finish()
            return self._built

    def _read_file(self, path: Path) -> None:
        start = self._offsets.get(path, 0)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
        records, end = _records(path, data, 0, self.strict and start == 0, self.check)
        self._offsets[path] = start + end
        workers = min(4, os.cpu_count() or 1) if self.strict and len(records) > _PARALLEL_FROM else 1
        for scalars, tensors in _parse_in_parallel(path, records, workers):
            for tag, (steps, values) in scalars.items():
                self._scalars.setdefault(tag, []).extend(zip(steps, values, strict=True))
            self._tensors += tensors


_PARALLEL_FROM = 200_000  # records: below, one process is as fast as starting more
_FORKED: list[bytes] = []  # the records a forked worker parses (inherited, never pickled)
Parsed = tuple[dict[str, tuple[list[int], list[float]]], list[tuple[str, int, Any]]]


def _parse_in_parallel(path: Path, records: list[bytes], workers: int) -> list[Parsed]:
    """Parse ``records`` in ``workers`` forked processes (a long run on several cores: ``gradguard
    report`` only, never inside TensorBoard's threads), or here."""
    import multiprocessing

    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_parse(path, records, 0, len(records))]
    from concurrent.futures import ProcessPoolExecutor

    _FORKED[:] = records
    bounds = [(len(records) * k // workers, len(records) * (k + 1) // workers) for k in range(workers)]
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_parse_forked, [(path, a, b) for a, b in bounds]))
    finally:
        _FORKED.clear()


def _parse_forked(job: tuple[Path, int, int]) -> Parsed:
    return _parse(job[0], _FORKED, job[1], job[2])


def _parse(path: Path, records: list[bytes], first: int, last: int) -> Parsed:
    """The guard's summaries in ``records[first:last]``: scalars as (steps, values) columns per tag,
    and the tab's tensors and texts."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    scalars: dict[str, tuple[list[int], list[float]]] = {}
    tensors: list[tuple[str, int, Any]] = []
    parse = event_pb2.Event.FromString
    for n in range(first, last):
        try:
            event = parse(records[n])
        except Exception:
            raise ReportError(f"corrupt event file {path}: record {n} is not a TensorBoard event") from None
        step = event.step
        for value in event.summary.value:
            tag = value.tag
            if not tag.startswith("gradguard/"):
                continue
            if value.HasField("simple_value"):
                columns = scalars.get(tag)
                if columns is None:
                    columns = scalars[tag] = ([], [])
                columns[0].append(step)
                columns[1].append(value.simple_value)
            elif value.HasField("tensor"):
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "scalars":
                    columns = scalars.setdefault(tag, ([], []))
                    columns[0].append(step)
                    columns[1].append(float(tensor_util.make_ndarray(value.tensor)))
                elif plugin in ("gradguard", "text"):
                    tensors.append((tag, step, tensor_util.make_ndarray(value.tensor)))
    return scalars, tensors
