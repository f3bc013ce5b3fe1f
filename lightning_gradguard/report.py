"""``gradguard report LOGDIR``: a run's gradient health in a terminal, from its TensorBoard event files.

Reads every run under LOGDIR (each folder holding ``events.out.tfevents.*`` files) with
tensorboard's own event-file reader, and prints per run:

* per layer: the median, max and last gradient norm, with flags ``vanishing`` (median below 1e-8,
  the guard's default ``vanish_threshold``), ``exploding`` (a non-finite value, or a logged norm
  above 1000x the median of the 5 logs before it) and ``spiky`` (above 10x that median);
* the total-norm trend (median of the last quarter of logs over the first quarter);
* the clipped fraction (mean of ``gradguard/clipped_fraction``);
* skipped and non-finite steps, each with its step and origin;
* each tracked sequence's per-timestep ``horizon`` and ``first_last_ratio``;
* a one-line verdict, and one line of advice per finding.

The suggested ``NormClip(max_norm=...)`` is the median of the run's finite pre-clip total norms:
Pascanu, Mikolov and Bengio (2013) advise a threshold near the typical norm, so that ordinary steps
pass untouched and only the outliers are rescaled.

Exit status: 0 for a healthy run, 1 when a run had non-finite steps or a finding whose kind
``--fail-on`` names (``exploding``, ``spike``, ``spiky``, ``vanishing``, ``vanishing_in_time``,
``dead``, ``unused``, ``loss_scale_collapse``), 2 for usage errors (a missing directory, no event
files, a corrupt or truncated event file, a run without the guard).

    gradguard report runs/                       # or: python -m lightning_gradguard report runs/
    gradguard report runs/ --json
    gradguard report runs/ --png health.png --fail-on exploding spike
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "RunData", "RunReport", "build_report", "main", "read_run", "report_from"]

_KINDS = (
    "exploding",
    "spike",
    "spiky",
    "vanishing",
    "vanishing_in_time",
    "exploding_in_time",
    "dead",
    "unused",
    "loss_scale_collapse",
    "nonfinite",
)
VANISH = 1e-8


class ReportError(Exception):
    """A usage error: printed as one line, exit status 2."""


@dataclass
class RunReport:
    """What ``gradguard report`` found in one run."""

    run: str
    steps: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)
    total_norm: dict[str, float] = field(default_factory=dict)
    clipped_fraction: float | None = None
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    timesteps: dict[str, dict[str, float]] = field(default_factory=dict)
    profiles: dict[str, list[float]] = field(default_factory=dict)
    alert_kinds: dict[str, int] = field(default_factory=dict)
    findings: list[dict[str, str]] = field(default_factory=list)
    verdict: str = ""

    def kinds(self) -> set[str]:
        found = {f["kind"] for f in self.findings} | set(self.alert_kinds)
        if self.nonfinite_steps:
            found.add("nonfinite")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RunData:
    """A run's guard data, however it was read: from event files (:func:`read_run`) or through
    TensorBoard's data provider (the GradGuard tab). :func:`report_from` judges it.

    Attributes:
        scalars: every ``gradguard/`` scalar series, ``tag -> [(step, value)]``.
        texts: every ``gradguard/`` text series, by its tag without ``/text_summary``.
        profiles: each tracked sequence's per-timestep profiles, ``name -> [(step, norms)]``.
        events: every event the tab's data holds (dicts with kind, step, origin, layers, message).
        config: the thresholds the guard ran with (empty for event files older than the tab).
    """

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    profiles: dict[str, list[tuple[int, list[float]]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def add_tensor(self, tag: str, step: int, value: Any) -> None:
        """Take one tensor datum of the tab's plugin (``gradguard``) or of the text plugin."""
        from lightning_gradguard import tabdata

        if tag.endswith("/text_summary") and tag.startswith("gradguard/"):
            self.texts.setdefault(tag[: -len("/text_summary")], []).append((step, _text_of(value)))
        elif tag.startswith(tabdata.PROFILE_PREFIX):
            values = [float(v) for v in value.reshape(-1).tolist()]
            self.profiles.setdefault(tag[len(tabdata.PROFILE_PREFIX) :], []).append((step, values))
        elif tag == tabdata.EVENTS_TAG:
            self.events.extend(json.loads(_text_of(value)))
        elif tag == tabdata.CONFIG_TAG:
            self.config = json.loads(_text_of(value))

    def finish(self) -> None:
        """Put every series in step order (profiles from older files come from JSON text)."""
        for tag, series in self.texts.items():
            m = re.match(r"gradguard/timestep_profile/(.+)$", tag)
            if m and m.group(1) not in self.profiles:
                self.profiles[m.group(1)] = [(step, json.loads(text)) for step, text in series]
        tables: tuple[dict[str, list[Any]], ...] = (self.scalars, self.texts, self.profiles)
        for table in tables:
            for series in table.values():
                series.sort(key=lambda item: item[0])
        self.events.sort(key=lambda e: e.get("step", 0))


def _text_of(value: Any) -> str:
    """The string in a text or JSON tensor (a 0-d or 1-d array of bytes)."""
    flat = value.reshape(-1).tolist() if hasattr(value, "reshape") else [value]
    first = flat[0] if flat else b""
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


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


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _largest_jump(values: Sequence[float], window: int = 5) -> float:
    """The largest ratio of a logged norm to the median of the (up to) ``window`` logs before it.

    Relative to the recent past, not to the whole run: a norm that is large early and decays as the
    model learns is not a spike.
    """
    worst = 0.0
    for i in range(3, len(values)):
        ref = statistics.median(values[max(0, i - window) : i])
        if ref > 0:
            worst = max(worst, values[i] / ref)
    return worst


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
    data = RunData()
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("gradguard/"):
            data.scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in acc.Tags().get("tensors", []):
        if tag.startswith("gradguard/"):
            for ev in acc.Tensors(tag):
                data.add_tensor(tag, ev.step, tensor_util.make_ndarray(ev.tensor_proto))
    data.finish()
    return data


def build_report(run: Path) -> RunReport:
    """Read one run's event files and judge its gradients."""
    return report_from(os.fspath(run), read_run(run))


def report_from(run: str, data: RunData) -> RunReport:
    """Judge one run's gradients from its data (the same code for the CLI and the tab).

    Raises:
        ReportError: the run holds no ``gradguard/`` metrics.
    """
    ours = data.scalars
    if not ours:
        raise ReportError(f"{run} holds no gradguard/ metrics: was GradGuard among the Trainer's callbacks?")
    steps = max(s for series in ours.values() for s, _ in series) + 1
    rep = RunReport(run=run, steps=steps)
    rep.layers = _layer_stats(ours)
    order = data.texts.get("gradguard/layer_order", [])
    rep.layer_order = json.loads(order[-1][1]) if order else sorted(rep.layers)
    totals = [v for _, v in ours.get("gradguard/total_norm", [])]
    fin = _finite(totals)
    if fin:
        q = max(1, len(fin) // 4)
        first, last = statistics.median(fin[:q]), statistics.median(fin[-q:])
        rep.total_norm = {
            "median": statistics.median(fin),
            "max": max(fin),
            "first_quarter": first,
            "last_quarter": last,
            "trend": last / first if first > 0 else math.nan,
        }
    fractions = [v for _, v in ours.get("gradguard/clipped_fraction", [])]
    rep.clipped_fraction = statistics.fmean(fractions) if fractions else None
    rep.skipped_steps = int(max((v for _, v in ours.get("gradguard/skipped_steps", [])), default=0))
    rep.nonfinite_steps = int(max((v for _, v in ours.get("gradguard/nonfinite_steps", [])), default=0))
    for _, line in data.texts.get("gradguard/nonfinite", []):
        m = re.match(r"step (\d+) origin (\S+) action (.+?) layers (.*)", line)
        if m:
            rep.nonfinite.append(
                {"step": int(m.group(1)), "origin": m.group(2), "action": m.group(3), "layers": m.group(4)}
            )
    rep.nonfinite_steps = max(rep.nonfinite_steps, len(rep.nonfinite))
    for tag, series in ours.items():
        m = re.match(r"gradguard/timestep/(.+)/(horizon|first_last_ratio|decay_per_step)$", tag)
        if m:
            rep.timesteps.setdefault(m.group(1), {})[m.group(2)] = series[-1][1]
    rep.profiles = {name: series[-1][1] for name, series in data.profiles.items() if series}
    for _, line in data.texts.get("gradguard/alerts", []):
        m = re.match(r"\*\*(\w+)\*\*", line)
        if m:
            rep.alert_kinds[m.group(1)] = rep.alert_kinds.get(m.group(1), 0) + 1
    _judge(rep)
    return rep


def _layer_stats(ours: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, Any]]:
    """Per layer: median, max, last and flags (vanishing, exploding, spiky)."""
    layers: dict[str, dict[str, Any]] = {}
    for tag, series in sorted(ours.items()):
        if not tag.startswith("gradguard/layer/"):
            continue
        values = [v for _, v in series]
        fin = _finite(values)
        median = statistics.median(fin) if fin else math.nan
        peak = max(fin) if fin else math.nan
        flags = []
        if fin and median < VANISH:
            flags.append("vanishing")
        jump = _largest_jump(fin)
        if len(fin) < len(values) or jump > 1000:
            flags.append("exploding")
        elif jump > 10:
            flags.append("spiky")
        layers[tag[len("gradguard/layer/") :]] = {"median": median, "max": peak, "last": values[-1], "flags": flags}
    return layers


def _judge(rep: RunReport) -> None:
    typical = rep.total_norm.get("median")
    suggestion = f"NormClip(max_norm={typical:.2g})" if typical and math.isfinite(typical) else "NormClip(max_norm=...)"
    if rep.nonfinite_steps:
        origins = sorted({n["origin"] for n in rep.nonfinite})
        rep.findings.append(
            {
                "kind": "nonfinite",
                "what": f"{rep.nonfinite_steps} non-finite steps ({rep.skipped_steps} skipped); origins: "
                f"{', '.join(origins) or 'unknown'}",
                "advice": "replay the first one from a dump (GradGuard(dump_dir=...)) and look at its origin layer; "
                f"if it follows an explosion, clip with {suggestion} or ZClip()",
            }
        )
    exploding = [n for n, v in rep.layers.items() if "exploding" in v["flags"]]
    spiky = [n for n, v in rep.layers.items() if "spiky" in v["flags"]]
    vanishing = [n for n, v in rep.layers.items() if "vanishing" in v["flags"]]
    if exploding:
        rep.findings.append(
            {
                "kind": "exploding",
                "what": f"exploding gradients in {', '.join(exploding)}",
                "advice": f"clip the total norm near its typical value: {suggestion}, or ZClip() for rare spikes",
            }
        )
    if spiky or "spike" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "spiky",
                "what": f"gradient spikes{(' in ' + ', '.join(spiky)) if spiky else ''}",
                "advice": f"ZClip() clips spikes against the run's own statistics; or {suggestion}",
            }
        )
    if vanishing or "vanishing" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "vanishing",
                "what": f"vanishing gradients{(' in ' + ', '.join(vanishing)) if vanishing else ''}",
                "advice": "check initialisation and normalisation (a residual path, LayerNorm); for RNNs a gated cell",
            }
        )
    for name, s in rep.timesteps.items():
        ratio = s.get("first_last_ratio", math.nan)
        if ratio == ratio and ratio < 1e-4:
            rep.findings.append(
                {
                    "kind": "vanishing_in_time",
                    "what": f"'{name}': the gradient through time vanishes (first/last {ratio:.2g}, horizon "
                    f"{s.get('horizon', math.nan):.0f} steps)",
                    "advice": "use a gated cell (LSTM or GRU; a forget-gate bias near 1-3) or a shorter truncation "
                    "(truncated BPTT) so that the dependency fits in the horizon",
                }
            )
        elif ratio == ratio and ratio > 1e4:
            rep.findings.append(
                {
                    "kind": "exploding_in_time",
                    "what": f"'{name}': the gradient through time explodes (first/last {ratio:.2g})",
                    "advice": f"clip ({suggestion}); an orthogonal recurrent init with gain <= 1",
                }
            )
    dead = [n for n, v in rep.layers.items() if v["median"] == 0.0]
    if dead or "dead" in rep.alert_kinds or "unused" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "dead" if dead or "dead" in rep.alert_kinds else "unused",
                "what": "layers with zero or no gradient" + (f": {', '.join(dead)}" if dead else ""),
                "advice": "check the wiring: a detached path, an unused branch, a zero multiplier or dead ReLUs",
            }
        )
    if "loss_scale_collapse" in rep.alert_kinds:
        rep.findings.append(
            {
                "kind": "loss_scale_collapse",
                "what": "the fp16 loss scale collapsed",
                "advice": "look for an fp16-unsafe op, lower the learning rate, or train in bf16",
            }
        )
    if not rep.findings:
        rep.verdict = f"healthy: {rep.steps} steps, no non-finite step, no exploding, spiky or vanishing layer"
    else:
        rep.verdict = "unhealthy: " + "; ".join(f["what"] for f in rep.findings)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}"


def render_text(rep: RunReport) -> str:
    lines = [f"== {rep.run} ({rep.steps} steps)"]
    if rep.layers:
        width = max(12, *(len(n) for n in rep.layers))
        lines.append(f"{'layer':<{width}}  {'median':>9}  {'max':>9}  {'last':>9}  flags")
        ordered = [n for n in rep.layer_order if n in rep.layers]
        for name in ordered + [n for n in rep.layers if n not in ordered]:
            v = rep.layers[name]
            lines.append(
                f"{name:<{width}}  {_fmt(v['median']):>9}  {_fmt(v['max']):>9}  {_fmt(v['last']):>9}  "
                f"{','.join(v['flags']) or '-'}"
            )
    t = rep.total_norm
    if t:
        lines.append(
            f"total norm: median {_fmt(t['median'])}, max {_fmt(t['max'])}; trend x{_fmt(t['trend'])} "
            f"(last quarter {_fmt(t['last_quarter'])} vs first {_fmt(t['first_quarter'])})"
        )
    if rep.clipped_fraction is not None:
        lines.append(f"clipped: {rep.clipped_fraction:.1%} of steps")
    lines.append(f"skipped steps: {rep.skipped_steps}; non-finite steps: {rep.nonfinite_steps}")
    for n in rep.nonfinite[:20]:
        lines.append(f"  step {n['step']}: origin {n['origin']} ({n['action']}), layers {n['layers']}")
    if len(rep.nonfinite) > 20:
        lines.append(f"  ... and {len(rep.nonfinite) - 20} more")
    for name, s in rep.timesteps.items():
        lines.append(
            f"timesteps '{name}': horizon {_fmt(s.get('horizon'))}, first/last {_fmt(s.get('first_last_ratio'))}, "
            f"decay/step {_fmt(s.get('decay_per_step'))}"
        )
    lines.append(f"verdict: {rep.verdict}")
    for f in rep.findings:
        lines.append(f"  advice ({f['kind']}): {f['advice']}")
    return "\n".join(lines)


def write_png(reports: Sequence[RunReport], path: Path) -> None:
    """The gradient-flow chart (median per layer) and the per-timestep profiles, one row per run."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--png needs matplotlib: pip install lightning-gradguard[plot]") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(12, 3.6 * len(reports)), squeeze=False, dpi=80)
    for row, rep in zip(axes, reports, strict=True):
        names = [n for n in rep.layer_order if n in rep.layers] or list(rep.layers)
        med = [rep.layers[n]["median"] for n in names]
        row[0].bar(range(len(names)), [m if m > 0 else 0 for m in med], color="#4c72b0")
        row[0].set_yscale("log")
        row[0].axhline(VANISH, color="#8172b2", linestyle="--", linewidth=1, label="vanishing 1e-8")
        row[0].set_xticks(range(len(names)))
        row[0].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        row[0].set_title(f"{Path(rep.run).name}: median gradient norm per layer", fontsize=9)
        row[0].legend(fontsize=7)
        if rep.profiles:
            for name, profile in rep.profiles.items():
                row[1].semilogy([v if v > 0 else float("nan") for v in profile], label=name)
            row[1].set_xlabel("timestep t")
            row[1].set_title("per-timestep ‖∂L/∂x_t‖ (latest)", fontsize=9)
            row[1].legend(fontsize=7)
        else:
            row[1].axis("off")
            row[1].text(0.5, 0.5, "no tracked sequences", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradguard`` and ``python -m lightning_gradguard``."""
    parser = argparse.ArgumentParser(prog="gradguard", description="GradGuard's command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("report", help="a run's gradient health from its TensorBoard event files")
    rp.add_argument("logdir", type=Path, help="a run's log directory, or a folder of runs")
    rp.add_argument("--json", action="store_true", help="print JSON instead of text")
    rp.add_argument("--png", type=Path, help="write the gradient-flow chart and per-timestep profiles here")
    rp.add_argument("--fail-on", nargs="*", default=[], choices=_KINDS, metavar="KIND",
                    help=f"exit 1 when a run has a finding of these kinds ({', '.join(_KINDS)})")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    try:
        reports = [build_report(run) for run in find_runs(args.logdir)]
        if args.png:
            write_png(reports, args.png)
    except ReportError as exc:
        print(f"gradguard report: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2, default=str))
    else:
        print("\n\n".join(render_text(r) for r in reports))
    failing = set(args.fail_on)
    bad = any(r.nonfinite_steps or (r.kinds() & failing) for r in reports)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
