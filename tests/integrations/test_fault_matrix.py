"""The fault matrix: every fault under every `on_nonfinite` policy, asserted in full.

The README's fault table is this test's table. (A fault on one rank only under DDP is in
tests/integrations/test_ddp.py: both ranks skip, raise or stop together.)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_gradguard import GradGuard, GradGuardWarning, NonFiniteGradientError
from tests.helpers import FaultNet, assert_same_state, trainer

ALL = ["l0", "l1", "l2"]
# name: (faults, FaultNet kwargs, trainer kwargs, fault steps, expected kind, origin, layers)
FAULTS: dict[str, tuple[dict[int, tuple[Any, ...]], dict[str, Any], dict[str, Any], list[int], str, Any, list[str]]] = {
    "nan_loss": ({2: ("loss", math.nan)}, {}, {}, [2], "nonfinite", "loss", ALL),
    "inf_loss": ({2: ("loss", math.inf)}, {}, {}, [2], "nonfinite", "loss", ALL),
    "nan_grad_l1": ({2: ("grad", 1, math.nan)}, {}, {}, [2], "nonfinite", "l1", ["l0", "l1"]),
    "inf_grad_l2": ({2: ("grad", 2, math.inf)}, {}, {}, [2], "nonfinite", "l2", ALL),
    "nan_input": ({2: ("input", math.nan)}, {}, {}, [2], "nonfinite", "loss", ALL),
    # SGD at lr 1e36: step 0's finite update throws the weights to ~1e36; step 1 overflows
    # (every later step overflows too: the weights stay where step 0 threw them, finite but huge)
    "lr_spike": ({}, {"lr": 1e36, "optim": "sgd"}, {}, [1, 2], "nonfinite", "loss", ALL),
    "fp16_overflow": ({2: ("loss", 1e30)}, {}, {"plugins": [MixedPrecision("16-mixed", "cpu")]}, [2],
                      "amp_overflow", None, []),
    "every_step_30": ({s: ("grad", 1, math.nan) for s in range(30)}, {}, {}, list(range(30)), "nonfinite", "l1",
                      ["l0", "l1"]),
}
STEPS = {"lr_spike": 3, "every_step_30": 30}


@pytest.mark.parametrize("policy", ["skip", "warn", "raise", "stop"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_matrix(fault: str, policy: str) -> None:
    faults, net_kw, trainer_kw, fault_steps, kind, origin, layers = FAULTS[fault]
    model = FaultNet(faults, **net_kw)
    guard = GradGuard(on_nonfinite=policy)  # type: ignore[arg-type]
    steps = STEPS.get(fault, 5)
    t = trainer([guard], steps=steps, **trainer_kw)
    raised: BaseException | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        try:
            t.fit(model)
        except NonFiniteGradientError as exc:
            raised = exc
    first = fault_steps[0]
    amp = kind == "amp_overflow"
    events = [e for e in guard.events if e.kind == kind]
    assert events, f"no {kind} event"
    if kind == "amp_overflow":  # the GradScaler may also overflow while it calibrates its scale
        events = [e for e in events if e.step == first]
    ev = events[0]
    assert (ev.step, ev.origin, list(ev.layers)) == (first, origin, layers)

    if amp:  # the GradScaler's business under every policy: no skip, no stop, no raise
        assert raised is None and t.global_step == steps and guard.skipped_steps == 0
        assert guard.core.amp_overflow_steps >= 1 and guard.nonfinite_steps == 0
        assert_same_state(model.snapshots[first], model.after[first])  # the scaler skipped optimizer.step
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return

    if policy == "raise":
        assert raised is not None and raised.event is not None and raised.event.step == first
        assert guard.nonfinite_steps == 1 and guard.skipped_steps == 0
        return
    if policy == "stop":
        assert raised is None and t.global_step == first + 1 and t.should_stop
        assert guard.nonfinite_steps == guard.skipped_steps == 1
        assert_same_state(model.snapshots[first], model.after[first])
        return
    if policy == "warn":
        assert raised is None and t.global_step == steps and guard.skipped_steps == 0
        assert guard.nonfinite_steps >= len(fault_steps)
        assert ev.action == "warned"
        return
    # skip: weights and optimizer state exactly as before each faulty step; training continues
    if fault == "every_step_30":  # 25 consecutive skips (the default limit) raise: never skip forever
        assert raised is not None and "25 consecutive" in str(raised)
        assert guard.skipped_steps == 25 and t.global_step == 24  # raised inside step 24
        assert_same_state(model.snapshots[0], model.snapshots[24])
        return
    assert raised is None and t.global_step == steps
    assert guard.nonfinite_steps == guard.skipped_steps == len(fault_steps)
    for s in fault_steps:
        assert_same_state(model.snapshots[s], model.after[s])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.core.origins == {origin: len(fault_steps)}
