"""Timings at depth: ``gradguard report`` and the tab's routes on synthetic deep runs (``deep_run.py``).

    python benchmarks/depth_bench.py                 # writes benchmarks/RESULTS-depth.md

Measured, each in a fresh process where it matters (2 CPUs here):

* ``gradguard report --help``: the command's start (it imports neither torch nor Lightning);
* ``gradguard report LOGDIR``: reading and judging a 300-layer x 1,000-step run (the issue's 19 MB)
  and a 500-layer x 10,000-step run (targets: under 30 s);
* the tab on both runs: the plugin's first read of the run and its heatmap and verdict (in the
  background, at TensorBoard's start, while TensorBoard loads the same files far more slowly), then
  each of its four routes (target: each under 2 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deep_run import write_deep_run  # this folder


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True, timeout=900)
    return time.perf_counter() - start


def _routes(logdir: Path) -> dict[str, float]:
    """The tab's routes on a local logdir, as TensorBoard serves it: the plugin reads every run once at
    start, in the background (while TensorBoard loads the same files); then each route is timed."""
    from tensorboard import context
    from tensorboard.plugins import base_plugin

    from lightning_gradguard.tensorboard.plugin import GradGuardPlugin

    start = time.perf_counter()
    plugin = GradGuardPlugin(base_plugin.TBContext(data_provider=None, logdir=str(logdir)))
    ctx, out = context.RequestContext(), {}
    while ("report", "deep") not in plugin._derived:  # the background read and its two costly answers
        time.sleep(0.05)
    out["the first read and answers, in the background at start"] = time.perf_counter() - start
    for name in ("layers", "report", "timesteps", "events"):
        plugin._cache.clear()  # each route as if asked alone: it checks the files for new records
        start = time.perf_counter()
        getattr(plugin, name)(ctx, "", "deep") if name != "events" else plugin.read(ctx, "", "deep").events
        out[f"route `{name}`"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-depth.md"))
    parser.add_argument("--big", default="500x10000", help="layers x steps of the large run")
    args = parser.parse_args()
    layers, steps = (int(v) for v in args.big.split("x"))
    cli = [sys.executable, "-m", "lightning_gradguard", "report"]
    rows = [("`gradguard report --help`", f"{_timed([*cli, '--help']):.2f} s", "well under 1 s")]
    with tempfile.TemporaryDirectory() as tmp:
        small = write_deep_run(Path(tmp) / "small", 300, 1000).parent
        size = sum(p.stat().st_size for p in small.rglob("*")) / 2**20
        seconds = _timed([*cli, str(small)])
        rows.append((f"`gradguard report`, 300 layers x 1,000 steps ({size:.0f} MB)", f"{seconds:.2f} s", "-"))
        start = time.perf_counter()
        big = write_deep_run(Path(tmp) / "big", layers, steps).parent
        made = time.perf_counter() - start
        size = sum(p.stat().st_size for p in big.rglob("*")) / 2**20
        rows.append((f"`gradguard report`, {layers} layers x {steps:,} steps ({size:.0f} MB; written in {made:.0f} s)",
                     f"{_timed([*cli, str(big)]):.2f} s", "under 30 s"))  # fmt: skip
        for label, folder in (("300 x 1,000", small), (f"{layers} x {steps:,}", big)):
            for name, seconds in _routes(folder).items():
                target = "under 2 s" if name.startswith("route") else "-"
                rows.append((f"tab, {label}: {name}", f"{seconds:.2f} s", target))
    lines = [
        "# GradGuard at depth: report and tab timings",
        "",
        f"- date: {dt.date.today()}; command: `python benchmarks/depth_bench.py` (Python {sys.version.split()[0]})",
        "",
        "| what | time | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
