"""From a run's events to findings: what happened, how bad it was, and what to do.

Each finding is a dict ``{"kind", "severity", "what", "advice"}``. The events are the live guard's
(recorded with the run) or, for older files, the same detectors replayed on the logged series
(:mod:`.replay`): there is one definition of each kind, the detectors'.

Severity, from least to most:

==================== =========================================================================
``healthy``          nothing happened
``healthy with       large gradients early in training, or a clipper doing its job (its
notes``              clipped fraction is named); these are notes, not findings
``attention``        a finding the run survived: a spike or an explosion a clipper handled,
                     dead or unused layers, a vanishing or exploding gradient through time, a
                     collapsing fp16 loss scale
``unhealthy``        non-finite steps, the guard stopping the run, vanishing layers, a spike or
                     an explosion that no clipper handled, replicas that diverged (repaired or not:
                     the device that corrupted them is still there)
==================== =========================================================================

A non-finite *loss* is a forward-pass or loss fault, never "exploding gradients": clipping cannot
cure it, and the advice says so. ``exploding`` is kept for gradients that grew: a total norm above
``explode_threshold``, or a non-finite gradient that began in a layer right after a spike.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradguard.health.ranks import DIVERGENCE, named_ranks, where
from lightning_gradguard.primitives.text import plural

__all__ = ["SEVERITIES", "Evidence", "block_of", "findings_of", "natural_key", "severity_of", "summarise_layers"]

SEVERITIES = ("healthy", "healthy with notes", "attention", "unhealthy")
_GROWTH_WINDOW = 3  # a non-finite step this many steps (or fewer) after a spike followed growth


class Evidence:
    """What the findings need besides the events: the norms, the clipper, the steps.

    Args:
        totals: the logged total norms before clipping, ``[(step, value)]``.
        clipped: the logged total norms after clipping, ``{step: value}`` (empty without a clipper).
        clip: the clipper the run used (its repr), or None.
        clipped_fraction: the mean logged clipped fraction, or None.
        steps: the run's number of steps.
        caveat: what a replay could not see ('' for recorded events).
        order: every layer, in forward order (for summaries of many layers).
        medians: each layer's median logged norm (to name the worst few).
    """

    def __init__(
        self,
        totals: Sequence[tuple[int, float]],
        clipped: Mapping[int, float],
        clip: str | None,
        clipped_fraction: float | None,
        steps: int,
        caveat: str = "",
        order: Sequence[str] = (),
        medians: Mapping[str, float] | None = None,
    ) -> None:
        self.totals = dict(totals)
        self.finite = sorted(v for v in self.totals.values() if math.isfinite(v))
        self.clipped = clipped
        self.clip = clip
        self.clipped_fraction = clipped_fraction
        self.steps = steps
        self.caveat = caveat
        self.order = list(order)
        self.medians = dict(medians or {})

    def handled(self, step: int) -> bool:
        """Whether the clipper scaled the step's gradients down (or, unlogged, whether one was in force)."""
        if self.clip is None:
            return False
        before, after = self.totals.get(step), self.clipped.get(step)
        if before is None or after is None:
            return True
        return after < before

    def distribution(self) -> str:
        """The total norm's logged distribution, for advice that sets a threshold."""
        if not self.finite:
            return "no finite total norm was logged"
        fin = self.finite
        q = statistics.quantiles(fin, n=100, method="inclusive") if len(fin) > 1 else [fin[0]] * 99
        return (
            f"the total norm's median over {len(self.finite)} logged steps is {statistics.median(self.finite):.3g}, "
            f"its 99th percentile {q[98]:.3g}, its max {self.finite[-1]:.3g}"
        )

    def suggestion(self) -> str:
        typical = statistics.median(self.finite) if self.finite else math.nan
        return f"NormClip(max_norm={typical:.2g})" if math.isfinite(typical) else "NormClip(max_norm=...)"


def _steps(events: Sequence[Mapping[str, Any]], most: int = 5) -> str:
    """``step 5`` or ``steps 5, 9`` (and how many more)."""
    steps = sorted({int(e["step"]) for e in events})
    shown = ", ".join(str(s) for s in steps[:most])
    more = f" and {len(steps) - most} more" if len(steps) > most else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _layers(events: Sequence[Mapping[str, Any]], first_only: bool = False) -> list[str]:
    names: list[str] = []
    for e in events:
        for name in (e.get("layers") or [])[: 1 if first_only else None]:
            if name not in names:
                names.append(name)
    return names


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.2`` before ``layers.10``: digit runs compare as numbers.

    Example::

        >>> sorted(["layers.10", "layers.2", "head"], key=natural_key)
        ['head', 'layers.2', 'layers.10']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def block_of(name: str) -> str:
    """The model's own unit a layer belongs to: its name up to its first index (``blocks.3.attn`` → ``blocks.3``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _spans(names: Sequence[str], index: Mapping[str, int]) -> list[tuple[str, str]]:
    """Runs of names that are consecutive in forward order, as (first, last)."""
    runs: list[list[str]] = []
    for name in names:
        if runs and index.get(name, -2) == index.get(runs[-1][-1], -5) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return [(run[0], run[-1]) for run in runs]


def summarise_layers(names: Sequence[str], order: Sequence[str], medians: Mapping[str, float] | None = None,
                     most: int = 4) -> str:  # fmt: skip
    """A few layers by name; many as a count and ranges in forward order, grouped by the model's own
    blocks when ranges do not summarise them, with the worst few (the smallest median norm).

    Example::

        >>> order = [f"layers.{i}" for i in range(300)]
        >>> summarise_layers(order[:275], order)
        '275 of 300 layers: layers.0 … layers.274 (the first 275 in forward order)'
        >>> blocks = [f"blocks.{b}.{p}" for b in range(12) for p in ("attn", "mlp")]
        >>> summarise_layers([n for n in blocks if n.endswith("attn")], blocks)
        '12 of 24 layers, in 12 blocks: blocks.0 … blocks.11 (attn in each)'
    """
    index = {name: i for i, name in enumerate(order)}
    ranked = sorted(set(names), key=lambda n: (index.get(n, len(index)), natural_key(n)))
    if len(ranked) <= most:
        return ", ".join(ranked)
    total = len(order) or len(ranked)
    spans = _spans(ranked, index)
    if len(spans) <= 3:
        where = ", ".join(a if a == b else f"{a} … {b}" for a, b in spans)
        if len(spans) == 1 and index.get(ranked[0]) == 0:
            where += f" (the first {len(ranked)} in forward order)"
        elif len(spans) == 1 and index.get(ranked[-1]) == total - 1:
            where += f" (the last {len(ranked)} in forward order)"
        text = f"{len(ranked)} of {total} layers: {where}"
    else:
        blocks = list(dict.fromkeys(block_of(n) for n in ranked))
        if any(block_of(n) != n for n in ranked):  # names under the model's own blocks: name the blocks
            tails = {n[len(block_of(n)) + 1 :] for n in ranked}
            same = f" ({tails.pop()} in each)" if len(tails) == 1 and "" not in tails else ""
            block_index = {b: i for i, b in enumerate(dict.fromkeys(block_of(n) for n in order))}
            where = ", ".join(a if a == b else f"{a} … {b}" for a, b in _spans(blocks, block_index)[:3])
            text = f"{len(ranked)} of {total} layers, in {len(blocks)} blocks: {where}{same}"
        else:
            text = f"{len(ranked)} of {total} layers from {ranked[0]} to {ranked[-1]}, in {len(spans)} runs"
    finite = {n: v for n, v in (medians or {}).items() if n in set(ranked) and math.isfinite(v) and v > 0}
    if finite and len(finite) > most:
        worst = sorted(finite, key=finite.__getitem__)[:3]
        text += "; worst: " + ", ".join(f"{n} ({finite[n]:.2g})" for n in worst)
    return text


def _stopped(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    stop = [e for e in events if e["kind"] == "stopped"]
    if not stop:
        return []
    last = stop[-1]
    # The verdict leads with "stopped by GradGuard at step N": the message's own opening says it again.
    cause = re.sub(r"^GradGuard(?: stopped the run at step \d+)?:\s*", "", str(last.get("message") or ""))
    return [{"kind": "stopped", "severity": "unhealthy", "what": f"stopped by GradGuard at step {last['step']}",
             "advice": cause or "the guard ended the run"}]  # fmt: skip


def _nonfinite(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    bad = [e for e in events if e["kind"] == "nonfinite"]
    if not bad:
        return []
    loss = [e for e in bad if e.get("origin") == "loss"]
    grads = [e for e in bad if e.get("origin") != "loss"]
    skipped = sum(1 for e in bad if str(e.get("action", "")).startswith("skipped"))
    parts, advice = [], []
    if loss:
        parts.append(f"the loss was non-finite at {_steps(loss)} (a forward-pass or loss fault, not a "
                     "gradient explosion)")  # fmt: skip
        advice.append(
            "look at the forward pass of the first bad step (GradGuard(dump_dir=...) keeps its batch): a carried "
            "hidden state, an exp or log, an fp16 overflow; clipping gradients cannot cure it"
        )
    if grads:
        origins = sorted({str(e.get("origin")) for e in grads})
        parts.append(f"non-finite gradients at {_steps(grads)}, beginning in {', '.join(origins)}")
        advice.append("replay the first one from a dump (GradGuard(dump_dir=...)) and look at its origin layer")
    what = f"{plural(len(bad), 'non-finite step')} ({skipped} skipped): " + "; ".join(parts)
    return [{"kind": "nonfinite", "severity": "unhealthy", "what": what + ev.caveat, "advice": "; ".join(advice)}]


def _grew(events: list[Mapping[str, Any]], spikes: list[int], ev: Evidence) -> list[dict[str, Any]]:
    """``exploding``: total norms above explode_threshold, or a non-finite gradient right after a spike."""
    over = [e for e in events if e["kind"] == "exploding"]
    after = [
        e for e in events
        if e["kind"] == "nonfinite" and e.get("origin") not in (None, "loss")
        and any(0 < int(e["step"]) - s <= _GROWTH_WINDOW for s in spikes)
    ]  # fmt: skip
    if not over and not after:
        return []
    parts = []
    if over:
        parts.append(f"the total norm exceeded explode_threshold at {_steps(over)}")
    if after:
        parts.append(f"non-finite gradients in {', '.join(_layers(after, first_only=True))} right after a spike")
    handled = bool(over) and not after and all(ev.handled(int(e["step"])) for e in over)
    return [{"kind": "exploding", "severity": "attention" if handled else "unhealthy",
             "what": "exploding gradients: " + "; ".join(parts) + (f" (clipped by {ev.clip})" if handled else ""),
             "advice": _clip_advice(ev, handled)}]  # fmt: skip


def _spiky(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    spikes = [e for e in events if e["kind"] == "spike"]
    if not spikes:
        return []
    worst = max(spikes, key=lambda e: float(e.get("value") or 0.0))
    where = summarise_layers(_layers(spikes, first_only=True), ev.order) or "the total norm"
    handled = all(ev.handled(int(e["step"])) for e in spikes)
    what = (f"gradient spikes at {_steps(spikes)} in {where} (worst: z = {float(worst.get('value') or 0):.1f} "
            f"at step {worst['step']})") + (f", clipped by {ev.clip}" if handled else "") + ev.caveat  # fmt: skip
    return [{"kind": "spiky", "severity": "attention" if handled else "unhealthy", "what": what,
             "advice": _clip_advice(ev, handled)}]  # fmt: skip


def _clip_advice(ev: Evidence, handled: bool) -> str:
    if handled:
        return f"{ev.clip} handled it; nothing to do unless it recurs ({ev.distribution()})"
    return (f"clip the outliers: {ev.suggestion()} (near the typical norm) or ZClip() for rare spikes; "
            f"{ev.distribution()}")  # fmt: skip


_SIMPLE: dict[str, tuple[str, str, str]] = {  # kind -> (severity, what, advice)
    "vanishing": ("unhealthy", "vanishing gradients in {layers}",
                  "check initialisation and normalisation (a residual path, LayerNorm); for RNNs a gated cell"),
    "dead": ("attention", "layers with exactly zero gradients: {layers}",
             "check the wiring: a detached path, a zero multiplier or dead ReLUs"),
    "unused": ("attention", "layers requiring grad that got no gradient: {layers}",
               "freeze them (requires_grad=False) or check the forward pass"),
    "vanishing_in_time": ("attention", "the gradient through time vanishes in {layers}",
                          "a gated cell (LSTM or GRU; a forget-gate bias near 1-3) or a shorter truncation "
                          "(truncated BPTT), so that the dependency fits in the horizon"),
    "exploding_in_time": ("attention", "the gradient through time explodes in {layers}",
                          "an orthogonal recurrent init with gain <= 1, and NormClip"),
    "loss_scale_collapse": ("attention", "the fp16 loss scale collapsed ({steps})",
                            "look for an fp16-unsafe op, lower the learning rate, or train in bf16"),
}  # fmt: skip


def _simple(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    out = []
    for kind, (severity, what, advice) in _SIMPLE.items():
        found = [e for e in events if e["kind"] == kind]
        if found:
            index = {name: i for i, name in enumerate(ev.order)}
            named = sorted(_layers(found), key=lambda n: (index.get(n, len(index)), natural_key(n)))
            layers = summarise_layers(named, ev.order, ev.medians) if named else "unknown layers"
            text = what.format(layers=layers, steps=_steps(found)) + ev.caveat
            out.append({"kind": kind, "severity": severity, "what": text, "advice": advice, "layers": named})
    return out


def _recovered(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    """Rollbacks and skipped spikes: faults the run survived because the guard undid them."""
    out = []
    back = [e for e in events if e["kind"] == "rollback"]
    if back:
        first = back[0].get("extra") or {}
        times = plural(len(back), "time")
        where = f"step {back[0]['step']} to the snapshot of step {first.get('snapshot_step', '?')}"
        what = f"rolled back {times} (first at {where}: {first.get('cause', 'unknown cause')})"
        stopped = any(e["kind"] == "stopped" and e["step"] >= back[-1]["step"] for e in events)
        survived = (
            "the rollbacks did not save the run (it stopped after the last one): what the fault lives in "
            "survives a rollback, such as a carried state (reset it in on_gradguard_rollback) or the data; "
            if stopped
            else "the run survived a persistent fault; "
        )
        advice = (
            f"{survived}the batches it undid are in the skip list "
            "(gradguard_skips.json beside the logs): look at the first fault before the first rollback"
        )
        out.append({"kind": "rollback", "severity": "attention", "what": what, "advice": advice})
    spikes = [e for e in events if e["kind"] == "spike_skipped"]
    if spikes:
        out.append({"kind": "spike_skipped", "severity": "attention",
                    "what": f"{len(spikes)} finite spike{'s' if len(spikes) > 1 else ''} skipped at {_steps(spikes)}",
                    "advice": "skip_spikes kept these updates out; if they recur, lower the learning rate or look at "
                    "the batches of those steps"})  # fmt: skip
    return out


def _diverged(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    """``replica_divergence``: data-parallel replicas that should hold the same weights did not."""
    found = [e for e in events if e["kind"] == DIVERGENCE]
    if not found:
        return []
    odd = {r["rank"]: where(r) for e in found for r in named_ranks(e)}
    majority = all((e.get("extra") or {}).get("majority") for e in found)
    who = ", ".join(odd[r] for r in sorted(odd))
    layers = summarise_layers(_layers(found), ev.order) or "unknown layers"
    actions = ", ".join(dict.fromkeys(str(e.get("action")) for e in found))
    head = f"{who} apart from the majority" if majority else f"no majority: {who} disagree"
    what = f"replicas diverged at {_steps(found)} ({head}) in {layers} ({actions})"
    advice = (
        "a faulty device returns wrong finite values (silent data corruption): run the vendor's diagnostics on "
        "the suspect devices (nvidia-smi -q, dcgmi diag) or leave their host out; Replicas(action='repair') "
        "copies the majority's weights, 'rollback' restores a snapshot"
        if majority
        else "with two replicas no majority tells which is wrong: run the vendor's diagnostics on both devices, "
        "or train on 3 or more replicas so that a majority can name the faulty one"
    )
    return [{"kind": DIVERGENCE, "severity": "unhealthy", "what": what, "advice": advice}]


def findings_of(events: Sequence[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    """The findings of a run's events, the guard's own stop first; a component's own kinds last."""
    rows = list(events)
    spikes = [int(e["step"]) for e in rows if e["kind"] == "spike"]
    return [
        *_stopped(rows, ev), *_diverged(rows, ev), *_nonfinite(rows, ev), *_grew(rows, spikes, ev), *_spiky(rows, ev),
        *_recovered(rows, ev), *_simple(rows, ev), *_components(rows, ev),
    ]  # fmt: skip


# Every kind a finding above speaks for (the rest are a component's own, or informational).
_KNOWN = frozenset({"stopped", "nonfinite", "amp_overflow", "exploding", "spike", "rollback", "spike_skipped",
                    "update_spike", "moment_collapse", DIVERGENCE, *_SIMPLE})  # fmt: skip


def _components(events: list[Mapping[str, Any]], ev: Evidence) -> list[dict[str, Any]]:
    """A component's own events (``docs/writing-a-component.md``): one finding per kind, in words of its
    own first message, ``attention`` (the run went on: what it skipped, it counted)."""
    out = []
    for kind in dict.fromkeys(str(e["kind"]) for e in events if e["kind"] not in _KNOWN):
        found = [e for e in events if e["kind"] == kind]
        skipped = sum(1 for e in found if e.get("action") == "skipped")
        what = f"{plural(len(found), kind + ' event')} at {_steps(found)}"
        what += f" ({skipped} skipped)" if skipped else ""
        out.append({"kind": kind, "severity": "attention", "what": what,
                    "advice": f"raised by a component of the run: {found[0].get('message') or kind}"})  # fmt: skip
    return out


def severity_of(findings: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    """The run's severity: the worst finding's, else ``healthy with notes`` or ``healthy``."""
    if findings:
        return max((str(f["severity"]) for f in findings), key=SEVERITIES.index)
    return "healthy with notes" if notes else "healthy"
