"""``gradguard report LOGDIR``: a run's gradient health in a terminal, from its TensorBoard event files.

Reads every run under LOGDIR (each folder holding ``events.out.tfevents.*`` files) and prints per
run what :func:`~lightning_gradguard.health.judge.judge_run` found (the same judgement as the tab):

* per layer: the median, max and last gradient norm, with flags;
* the total-norm trend (median of the last quarter of logs over the first quarter);
* the clipped fraction (mean of ``gradguard/clipped_fraction``);
* skipped and non-finite steps, each with its step and origin;
* each tracked sequence's per-timestep ``horizon`` and ``first_last_ratio``;
* for a data-parallel run whose events name ranks, a ``Per rank`` section (each rank's host and device,
  its replica divergences and replay verdicts) and the ``Suspect devices`` line (``--json``:
  ``per_rank`` and ``suspect_devices``, :mod:`~lightning_gradguard.health.ranks`);
* a one-line verdict, and one line of advice per finding.

A run shorter than its ``log_every_n_steps`` logged no metric: it is judged by the events the guard
recorded and the summary it wrote at the end of fit (``40 steps, no logging step``).

A run that cannot be read (a truncated or corrupt event file, a run without the guard) does not
hide the others: every readable run is reported, and each unreadable one is listed with why, after
them (``--json``: an entry ``{"run", "unreadable", "severity": "unreadable", "verdict"}``) and as one
line on stderr.

Exit status, the worst over the runs: 0 when every run is healthy, 1 when a run had non-finite steps,
replicas that diverged, or a finding whose kind ``--fail-on`` names, 2 when a run is unreadable (a CI
gate must not pass a run it could not judge) and for usage errors (a missing directory, no event files).

    gradguard report runs/                       # or: python -m lightning_gradguard report runs/
    gradguard report runs/ --json
    gradguard report runs/ --png health.png --fail-on exploding spike

``gradguard replay DUMP --model MODULE:FACTORY``: the same replay attribution as the live guard, offline,
on a dump (``GradGuard(dump_dir=...)``): the model that ``FACTORY()`` builds gets the dump's weights,
the RNG state from before the step's forward pass is restored, and ``training_step(batch,
batch_idx)`` (or ``--loss MODULE:FN``, called as ``FN(model, batch)``) runs again, in float32 and,
with ``--precision bf16|fp16``, under autocast. Exit status 0 when the fault did not reproduce
here, 1 when it did, 2 for usage errors. Under gradient accumulation the first micro-batch is
replayed (the dump's RNG state is from before it). ``MODULE`` is imported with the working directory
on the path, as ``python -m`` has it.

A fault that does not reproduce offline is not called a hardware fault: the dump holds the batch, the
weights and the RNG state, not the trainer's state (``global_step``), a state the module carries
between steps, or the data pipeline, any of which the fault may depend on. The live replay's verdict,
when the dump holds one, is quoted beside it.

    gradguard replay dumps/gradguard-step000123-nonfinite.pt --model my_project.models:build

``gradguard check PATH...``: whether each checkpoint (Lightning's, a plain ``torch.save`` state dict,
a distributed checkpoint's directory, or every checkpoint in a directory) is safe to resume from: its
non-finite tensors by name, the health record the checkpoint gate wrote, a quarantine. Exit status 0
when every one is healthy, 1 when one is not, 2 when one cannot be read (:mod:`.check`).

    gradguard check checkpoints/last.ckpt || exit 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_gradguard.health.judge import KINDS, ReportError, RunHealth, judge_run
from lightning_gradguard.health.ranks import where
from lightning_gradguard.primitives.ranges import format_batch_ranges, format_int_ranges
from lightning_gradguard.primitives.text import plural

__all__ = ["main", "render_text", "replay_dump", "write_png"]

UNREADABLE = 2  # the exit status an unreadable run counts as


def build_report(run: Path) -> RunHealth:
    """Read one run's event files and judge its gradients.

    Raises:
        ReportError: an event file is corrupt or truncated, or the run holds nothing the guard writes.
    """
    from lightning_gradguard.tensorboard.eventfile import read_run

    return judge_run(os.fspath(run), read_run(run))


def build_reports(logdir: Path) -> tuple[list[RunHealth], list[dict[str, str]]]:
    """Every run under ``logdir``: the reports of those that read, and ``{"run", "unreadable"}`` (why)
    for each that does not.

    Raises:
        ReportError: ``logdir`` is missing, or holds no event file.
    """
    from lightning_gradguard.tensorboard.eventfile import find_runs

    reports: list[RunHealth] = []
    unreadable: list[dict[str, str]] = []
    for run in find_runs(logdir):
        try:
            reports.append(build_report(run))
        except ReportError as exc:
            unreadable.append({"run": os.fspath(run), "unreadable": str(exc)})
    return reports, unreadable


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}"


def render_text(rep: RunHealth) -> str:
    logged = "" if rep.logged_steps else ", no logging step"  # a run shorter than log_every_n_steps
    lines = [f"== {rep.run} ({plural(rep.steps, 'step')}{logged})"]
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
    for r in rep.rollbacks[:20]:
        lines.append(f"  rollback at step {r['step']} to the snapshot of step {r['snapshot_step']}: {r['cause']}")
        if r["batches"]:
            lines.append(f"    batches undone: {format_batch_ranges(r['batches'])}")
    if len(rep.rollbacks) > 20:
        lines.append(f"  ... and {len(rep.rollbacks) - 20} more rollbacks")
    for r in rep.replays:
        where = f", forward origin {r['forward_origin']}" if r.get("forward_origin") else ""
        ranks = f", rank(s) {', '.join(map(str, r['faulty_ranks']))}" if r.get("faulty_ranks") else ""
        lines.append(f"  replay of step {r['step']} ({r['kind']}): {r['verdict']}{where}{ranks}")
    if rep.skipped_batches:
        by_reason: dict[str, list[int]] = {}
        for skip in rep.skipped_batches:
            by_reason.setdefault(skip["reason"], []).append(skip["step"])
        shown = "; ".join(f"{format_int_ranges(steps, most=10)} ({why})" for why, steps in by_reason.items())
        lines.append(f"  skipped steps: {shown}")
    for name, s in rep.timesteps.items():
        lines.append(
            f"timesteps '{name}': horizon {_fmt(s.get('horizon'))}, first/last {_fmt(s.get('first_last_ratio'))}, "
            f"decay/step {_fmt(s.get('decay_per_step'))}"
        )
    lines.extend(_per_rank_lines(rep))
    lines.append(f"verdict: {rep.verdict}")
    if rep.events_from == "replayed":
        lines.append("  (an older event file: its findings are the guard's detectors replayed on the logged steps)")
    for note in rep.notes if rep.findings else ():
        lines.append(f"  note: {note}")
    for f in rep.findings:
        lines.append(f"  advice ({f['kind']}): {f['advice']}")
    return "\n".join(lines)


def _per_rank_lines(rep: RunHealth, most: int = 20) -> list[str]:
    """The ``Per rank`` section (only for a run whose events name ranks) and its ``Suspect devices`` line."""
    if not rep.per_rank and not rep.suspect_devices:
        return []
    lines = ["Per rank:"]
    for rank, row in rep.per_rank.items():
        lines.append(f"  {where({'rank': rank, **row})}:")
        said = []
        for d in row["divergences"]:
            shown = ", ".join(d["layers"][:4]) + (f" and {len(d['layers']) - 4} more" if len(d["layers"]) > 4 else "")
            how = "apart from the majority" if d["majority"] else "the replicas disagree, no majority,"
            said.append((d["step"], f"    step {d['step']}: {how} in {shown or 'unknown layers'} ({d['action']})"))
        for r in row["replays"]:
            faulty = "; faulty on this rank" if r["faulty"] else ""
            whose = f" of rank {r['batch_of']}'s batch" if "batch_of" in r else ""
            said.append((r["step"], f"    step {r['step']} ({r['kind']}): replay{whose} {r['verdict']}{faulty}"))
        said.sort(key=lambda item: item[0])
        lines.extend(line for _, line in said[:most])
        if len(said) > most:
            lines.append(f"    ... and {len(said) - most} more")
    suspects = []
    for s in rep.suspect_devices:
        by: dict[str, list[int]] = {}
        for proof in s["evidence"]:
            verdict = str(proof.get("verdict", ""))
            label = "diverged" if "verdict" not in proof else f"{verdict.split(':')[0]} replay"  # transient, device
            by.setdefault(label, []).append(proof["step"])
        proofs = ", ".join(f"{label} at step{'s' if len(steps) > 1 else ''} {format_int_ranges(steps, most=5)}"
                           for label, steps in by.items())  # fmt: skip
        suspects.append(f"{where(s)}: {proofs}")
    lines.append(f"Suspect devices: {'; '.join(suspects) or 'none'}")
    return lines


def _load(spec: str, what: str) -> Any:
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ReportError(f"{what} must be MODULE:NAME, got {spec!r}")
    cwd = os.getcwd()  # the console script's path lacks it; `python -m` puts it first
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ReportError(f"cannot load {what} {spec!r}: {exc}") from None


def replay_dump(
    path: Path, model_spec: str, loss_spec: str | None = None, precision: str | None = None
) -> dict[str, Any]:
    """Replay a dump's step offline (see the module's docstring); the attribution's result."""
    import torch

    from lightning_gradguard.core.attribution import attribute
    from lightning_gradguard.dump import load_dump

    try:
        dump = load_dump(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReportError(f"cannot read the dump {path}: {exc}") from None
    model = _load(model_spec, "--model")()
    model.load_state_dict(dump["model"])
    batch = dump["batch"]
    if int(dump.get("micro_batches", 1)) > 1:
        batch = batch[0]
    loss_fn = _load(loss_spec, "--loss") if loss_spec else None

    def closure() -> Any:
        if loss_fn is not None:
            return loss_fn(model, batch)
        for name in ("log", "log_dict"):  # no Trainer here: logging is a no-op
            object.__setattr__(model, name, lambda *args, **kwargs: None)
        return model.training_step(batch, dump["batch_idx"])

    params = [p for p in model.parameters() if p.requires_grad]
    context = None
    if precision is not None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        device = params[0].device.type if params else "cpu"

        def context() -> Any:
            return torch.autocast(device, dtype=dtype)

    result = attribute(closure, params, model=model, rng=dump["rng"], precision=context)
    event = dump.get("event", {})
    out = {"dump": str(path), "step": dump.get("global_step"), "kind": event.get("kind"), **result}
    live = (event.get("extra") or {}).get("replay")
    if isinstance(live, dict):  # what the live guard's replay said, on the machine that ran the step
        out["live_replay"] = live
    return out


def _replay_command(args: argparse.Namespace) -> int:
    from lightning_gradguard.core.attribution import TRANSIENT, describe

    try:
        result = replay_dump(args.dump, args.model, args.loss, args.precision)
    except ReportError as exc:
        print(f"gradguard replay: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        text = _not_reproduced(result, args.precision) if result["verdict"] == TRANSIENT else describe(result)
        print(f"step {result['step']} ({result['kind']}), {args.dump}: {text}")
    return 0 if result["verdict"] == TRANSIENT else 1


def _not_reproduced(result: dict[str, Any], precision: str | None) -> str:
    """What a replay that stayed finite offline says: what the dump lacks, never the hardware on its own
    (the live replay's verdict, when the dump holds one, is the evidence)."""
    from lightning_gradguard.core.attribution import describe

    text = (f"Replay: did not reproduce offline ({result.get('replays', 2)} replays of the dump's batch, weights "
            "and RNG state): the fault may depend on state the dump does not hold (trainer state such as "
            "global_step, a state the module carries between steps, the data pipeline)")  # fmt: skip
    if precision is None:
        text += "; if the run used autocast, also replay with --precision bf16 or fp16"
    live = result.get("live_replay")
    if isinstance(live, dict) and live.get("verdict"):
        text += f". The live replay said: {describe(live).removeprefix('Replay: ')}"
    return text if text.endswith(".") else text + "."


def write_png(reports: Sequence[RunHealth], path: Path) -> None:
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
        row[0].axhline(
            rep.vanish_threshold,
            color="#8172b2",
            linestyle="--",
            linewidth=1,
            label=f"vanish_threshold {rep.vanish_threshold:g}",
        )
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
    rp = sub.add_parser(
        "report", help="a run's gradient health from its TensorBoard event files",
        description="A run's gradient health from its TensorBoard event files. Every readable run is reported; "
        "an unreadable one (a truncated or corrupt event file, a run without the guard) is listed with why.",
        epilog="Exit status, the worst over the runs: 0 healthy; 1 non-finite steps, diverged replicas or a "
        "--fail-on finding; "
        "2 a run that cannot be read, or a usage error (a missing directory, no event files).",
    )  # fmt: skip
    rp.add_argument("logdir", type=Path, help="a run's log directory, or a folder of runs")
    rp.add_argument("--json", action="store_true", help="print JSON instead of text")
    rp.add_argument("--png", type=Path, help="write the gradient-flow chart and per-timestep profiles here")
    rp.add_argument(
        "--fail-on",
        nargs="*",
        default=[],
        choices=KINDS,
        metavar="KIND",
        help=f"exit 1 when a run has a finding of these kinds ({', '.join(KINDS)})",
    )
    pp = sub.add_parser("replay", help="replay a dump: a data or precision fault, or one that does not reproduce")
    pp.add_argument("dump", type=Path, help="a dump written by GradGuard(dump_dir=...)")
    pp.add_argument("--model", required=True, help="MODULE:FACTORY, a callable that builds the model")
    pp.add_argument("--loss", help="MODULE:FN, called as FN(model, batch) -> loss (default: training_step)")
    pp.add_argument("--precision", choices=("bf16", "fp16"), help="also replay under this autocast")
    pp.add_argument("--json", action="store_true", help="print JSON instead of text")
    cp = sub.add_parser(
        "check", help="whether checkpoints are safe to resume from (exit 0 healthy, 1 not, 2 unreadable)",
        description="Whether each checkpoint is safe to resume from: its non-finite tensors by name, the health "
        "record the checkpoint gate wrote, a quarantine after a rollback. Lightning checkpoints, torch.save "
        "state dicts, distributed checkpoint directories, or every checkpoint in a directory.",
        epilog="Exit status: 0 every checkpoint healthy; 1 one is not; 2 one cannot be read, or a usage error.",
    )  # fmt: skip
    cp.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="a checkpoint, or a directory of them")
    cp.add_argument("--json", action="store_true", help="print JSON instead of text")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    if args.command == "replay":
        return _replay_command(args)
    if args.command == "check":
        from lightning_gradguard.cli import check

        return check.main(args.paths, args.json)
    try:
        reports, unreadable = build_reports(args.logdir)
        if args.png and reports:
            write_png(reports, args.png)
    except ReportError as exc:
        print(f"gradguard report: error: {exc}", file=sys.stderr)
        return 2
    for bad_run in unreadable:
        print(f"gradguard report: error: {bad_run['unreadable']}", file=sys.stderr)
    if args.json:
        rows = [r.as_dict() for r in reports] + [
            {**u, "severity": "unreadable", "verdict": f"unreadable: {u['unreadable']}"} for u in unreadable
        ]
        print(json.dumps(rows, indent=2, default=str))
    elif reports:  # with no readable run, the errors above are the whole answer
        blocks = [render_text(r) for r in reports]
        if unreadable:
            blocks.append("\n".join([f"== {len(unreadable)} unreadable run{'s' if len(unreadable) > 1 else ''}"]
                                    + [f"  {u['run']}: {u['unreadable']}" for u in unreadable]))  # fmt: skip
        print("\n\n".join(blocks))
    failing = set(args.fail_on)
    statuses = [1 if r.fails(failing) else 0 for r in reports]
    return max(statuses + [UNREADABLE] * len(unreadable))
