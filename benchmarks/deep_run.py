"""A synthetic deep run's event file, for timing ``gradguard report`` and the tab at depth.

    python benchmarks/deep_run.py OUT --layers 300 --steps 1000

It writes what ``GradGuard(log_every_n_steps=1)`` writes for a ``layers``-deep MLP whose gradients
vanish with depth (and are exactly zero in the first few layers): the per-layer and total norm
scalars, the configuration, the layer order and the events, through the same writers as the guard
(:mod:`lightning_gradguard.tensorboard.format`), without training anything. The scalars (one
TensorBoard event each, as Lightning's logger writes them) are written as TFRecords directly, their
CRCs computed in bulk: 5 million events take seconds instead of the SummaryWriter's minutes.
"""

from __future__ import annotations

import argparse
import math
import random
import struct
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard.events import GradEvent
from lightning_gradguard.tensorboard import format as tbformat


def write_deep_run(out: Path, layers: int, steps: int, dead: int = 3, seed: int = 0) -> Path:
    """Write the run under ``out/deep``; returns that folder."""
    rng = random.Random(seed)
    run = out / "deep"
    writer = SummaryWriter(str(run))
    names = [f"layers.{i}" for i in range(layers)]
    tbformat.write_config(writer, {"vanish_threshold": 1e-8, "explode_threshold": None, "timestep_vanish_ratio": 1e-4,
                                   "spike_zscore": 6.0, "norm_type": 2.0, "spike_warmup": 50, "vanish_ratio": None,
                                   "vanish_patience": 3, "min_loss_scale": 1.0, "clip": None})  # fmt: skip
    tbformat.write_layer_order(writer, names, 0)
    vanishing = GradEvent("vanishing", step=2, layers=tuple(names[dead : int(0.9 * layers)]), value=1e-12)
    zero = GradEvent("dead", step=0, layers=tuple(names[:dead]), value=0.0)
    tbformat.write_events(writer, [(vanishing, True), (zero, True)], 2)
    writer.close()
    payloads = []
    tags = [f"{tbformat.LAYER_PREFIX}{name}" for name in names]
    for step in range(steps):
        total = 0.0
        for i, tag in enumerate(tags):
            # deeper (later) layers keep their gradient; earlier ones vanish, the first `dead` are exactly zero
            value = 0.0 if i < dead else 10 ** (-12 + 12 * i / layers) * math.exp(rng.gauss(0, 0.1))
            payloads.append(_scalar(tag, value, step))
            total += value * value
        payloads.append(_scalar("gradguard/total_norm", math.sqrt(total), step))
        payloads += [_scalar("gradguard/skipped_steps", 0.0, step), _scalar("gradguard/nonfinite_steps", 0.0, step)]
    _write_records(run / "events.out.tfevents.2.scalars", payloads)
    return run


def _scalar(tag: str, value: float, step: int) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=1.0, step=step, summary=summary).SerializeToString()  # type: ignore[no-any-return]


def _write_records(path: Path, payloads: list[bytes]) -> None:
    """TFRecords: length, masked CRC-32C of the length, data, masked CRC-32C of the data (CRCs in bulk)."""
    import numpy as np

    from lightning_gradguard.tensorboard.eventfile import masked_crc32c

    heads = [struct.pack("<Q", len(p)) for p in payloads]
    head_crc = masked_crc32c(np.frombuffer(b"".join(heads), dtype=np.uint8).reshape(-1, 8))
    body_crc = np.zeros(len(payloads), dtype=np.uint32)
    by_length: dict[int, list[int]] = {}
    for k, p in enumerate(payloads):
        by_length.setdefault(len(p), []).append(k)
    for length, ks in by_length.items():
        rows = np.frombuffer(b"".join(payloads[k] for k in ks), dtype=np.uint8).reshape(-1, length)
        body_crc[ks] = masked_crc32c(rows)
    with open(path, "wb") as f:
        for k, p in enumerate(payloads):
            f.write(heads[k] + struct.pack("<I", head_crc[k]) + p + struct.pack("<I", body_crc[k]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print(write_deep_run(args.out, args.layers, args.steps))
