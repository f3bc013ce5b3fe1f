"""A rollback restores the guard's own statistics and every RNG, not only the weights.

The snapshot keeps the clipper's statistics (ZClip's EMA and warm-up buffer, AutoClip's window), the
spike statistics (the device ones of ``skip_spikes`` and the spike detector's), and the Python,
numpy and torch RNG states. Rolling back puts each back as it was when the snapshot was taken.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pytest

from lightning_gradguard import AutoClip, Rollback, ZClip
from tests.core.test_rollback import Loop
from tests.helpers import assert_same_state

warnings.filterwarnings("ignore", message="GradGuard")


class RandomLoop(Loop):
    """The plain loop of test_rollback.py, whose Python and numpy RNGs move on every step too (data
    augmentation would), and which keeps the guard's statistics as they are after each step."""

    def __init__(self, **guard: Any) -> None:
        super().__init__(**guard)
        self.stats: dict[int, dict[str, Any]] = {}
        self.py_rng: dict[int, Any] = {}
        self.np_rng: dict[int, Any] = {}

    def one(self) -> Any:
        random.random()
        np.random.rand()
        step = self.step_no
        self.py_rng[step], self.np_rng[step] = random.getstate(), np.random.get_state()
        report = super().one()
        self.stats[step] = self.statistics()
        return report

    def statistics(self) -> dict[str, Any]:
        guard = self.guard
        detector = next(d for d in guard.detectors if d.state_key == "spike")
        assert guard.clip is not None and guard.spike is not None
        return {
            "clip": guard.clip.state_dict(),
            "spike statistic": guard.spike.state_dict(),  # the event's, the skip's and the rollback's
            "spike detector": detector.state_dict(),  # its per-layer EMA (which layers grew)
        }


@pytest.mark.parametrize("clip", [lambda: ZClip(warmup_steps=2, z_threshold=2.0), lambda: AutoClip(50.0, history=8)],
                         ids=["zclip", "autoclip"])  # fmt: skip
def test_a_rollback_restores_the_clipper_the_spike_statistics_and_every_rng(clip: Any) -> None:
    loop = RandomLoop(clip=clip(), skip_spikes=50.0, spike_zscore=6.0, spike_warmup=2, log_every_n_steps=1,
                      rollback=Rollback(every=3, keep=2))  # fmt: skip
    loop.run(8)
    assert [s.step for s in loop.guard.recovery.ring.snapshots] == [3, 6]  # type: ignore[union-attr]
    for name, value in loop.statistics().items():  # step 7 moved every statistic on
        with pytest.raises(AssertionError):
            assert_same_state(value, loop.stats[6][name])
    loop.guard.rollback()
    assert_same_state(loop.statistics(), loop.stats[6])  # as the snapshot of step 6 kept them
    assert random.getstate() == loop.py_rng[6]
    got, want = np.random.get_state(), loop.np_rng[6]
    assert got[0] == want[0] and np.array_equal(got[1], want[1]) and got[2:] == want[2:]
    assert_same_state(loop.state(), loop.pre[6])  # and the weights, moments, scheduler
