"""Vanishing and exploding gradients *through time*: the per-timestep profile of a recurrent module.

A first/last timestep norm ratio far below 1 means that the gradient from the loss dies before it
reaches the early steps (Bengio, Simard and Frasconi, 1994); far above 1, that it grows
geometrically back in time (Pascanu, Mikolov and Bengio, 2013).
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.detectors.base import Observation
from lightning_gradguard.events import GradEvent

__all__ = ["InTimeDetector"]


class InTimeDetector:
    """``vanishing_in_time`` / ``exploding_in_time`` events from each tracked sequence's first/last ratio.

    At most one event per (kind, sequence) per ``every`` optimizer steps; the next one says how many
    were left out.

    Args:
        ratio: a ratio below it vanishes, above its reciprocal explodes; in (0, 1).
        every: the rate limit, in optimizer steps.

    Example::

        >>> from lightning_gradguard.detectors.base import Observation
        >>> det = InTimeDetector(1e-4)
        >>> obs = Observation(9, 0, 1.0, True, False, logged=True,
        ...                   timestep_summaries={"rnn": {"first_last_ratio": 1e-9}})
        >>> [(e.kind, e.origin) for e in det.detect(obs)], det.detect(obs)
        ([('vanishing_in_time', 'rnn')], [])
    """

    headline = False
    state_key = "rate"

    def __init__(self, ratio: float, every: int = 100) -> None:
        self.ratio = ratio
        self.every = every
        self._rate: dict[tuple[str, str], list[int]] = {}

    def detect(self, obs: Observation) -> list[GradEvent]:
        events = []
        for name, summary in obs.timestep_summaries.items():
            ratio = summary["first_last_ratio"]
            if ratio < self.ratio:
                events += self._limited(obs.step, "vanishing_in_time", name, ratio, "vanishes")
            elif ratio > 1.0 / self.ratio:
                events += self._limited(obs.step, "exploding_in_time", name, ratio, "explodes")
        return events

    def _limited(self, step: int, kind: str, name: str, ratio: float, verb: str) -> list[GradEvent]:
        last, suppressed = self._rate.get((kind, name), [-(10**12), 0])
        if step - last < self.every:
            self._rate[(kind, name)] = [last, suppressed + 1]
            return []
        self._rate[(kind, name)] = [step, 0]
        more = f" ({suppressed} more times since step {last})" if suppressed else ""
        return [
            GradEvent(
                kind,  # type: ignore[arg-type]
                step=step,
                layers=(name,),
                origin=name,
                value=ratio,
                message=f"GradGuard: the gradient through time {verb} in '{name}' at step {step}: "
                f"first/last timestep norm ratio {ratio:.3g} (threshold {self.ratio:g}){more}.",
                action="none",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {f"{k}|{n}": v for (k, n), v in self._rate.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rate = {tuple(k.split("|", 1)): list(v) for k, v in dict(state).items()}  # type: ignore[misc]
