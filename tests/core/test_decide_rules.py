"""The rules of a step's decision (core/decide.py), each checked on its own: what `make mutate` showed no
test held.

The event that ends a run (`stopped`: after `on_nonfinite="raise"`, once under `"stop"`, at
`max_consecutive_skips`) names the last fault, its origin and what to look at next; the counters of a
checkpoint come back whole, and missing ones start at zero; skipped spikes are counted and reported; a
`DeviceSkip` sets a float32 flag whatever it is given, and a copy of it (a pickled guard) works on its own.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import GradEvent, GuardCore, NonFiniteGradientError
from lightning_gradguard.core.decide import DeviceSkip, Fault, StepPolicy, Verdict, can_skip_on_device
from lightning_gradguard.primitives.layout import LayerMap
from tests.core.test_core import MLP
from tests.core.test_robustness import Branchy
from tests.core.test_rollback import Loop

pytestmark = pytest.mark.filterwarnings("ignore::lightning_gradguard.GradGuardWarning")

NEXT = "look at a dump (dump_dir=...) of the first bad step"


def _run(core: GuardCore, model: MLP, steps: int, faults: dict[int, Any], optimizer_idx: int = 0) -> None:
    """The plain loop of test_core.py; a fault is a layer index (a NaN there) or "loss" (a NaN loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    for step in range(steps):
        fault = faults.get(step)
        model.poison_at = fault if isinstance(fault, int) else None
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if fault == "loss":
            loss = loss * math.nan
        core.observe_loss(loss)
        loss.backward()
        if not core.step(opt, optimizer_idx=optimizer_idx).skipped:
            opt.step()


# ------------------------------------------------------------------ the event that ends a run
def test_raise_records_the_stop_with_the_faults_origin_then_raises() -> None:
    model = MLP()
    core = GuardCore(model, on_nonfinite="raise")
    with pytest.raises(NonFiniteGradientError) as info:
        _run(core, model, 5, {3: 1}, optimizer_idx=1)
    fault, stop = core.events
    assert info.value.event == fault and fault.kind == "nonfinite" and fault.action == "raised"
    assert fault.optimizer_idx == 1 and fault.message == (
        "GradGuard: non-finite gradient at step 3 of optimizer 1 (total norm nan), origin 'b'; layers: a, b. Raising."
    )
    assert (stop.kind, stop.step, stop.layers, stop.origin, stop.optimizer_idx, stop.action) == (
        "stopped", 3, ("a", "b"), "b", 1, "raised"
    )
    assert math.isnan(stop.value) and math.isnan(fault.value)
    assert stop.message == (
        "GradGuard stopped the run at step 3: on_nonfinite='raise'; the last fault's origin 'b'. Next: the gradient "
        f"broke first at b: {NEXT}."
    )
    assert stop.extra == {"cause": "on_nonfinite='raise'"}


def test_stop_records_its_event_once_and_names_a_broken_loss() -> None:
    model = MLP()
    core = GuardCore(model, on_nonfinite="stop")
    _run(core, model, 6, {2: "loss", 4: "loss"})
    kinds = [(e.kind, e.step) for e in core.events]
    assert kinds == [("nonfinite", 2), ("stopped", 2), ("nonfinite", 4)]  # the stop is said once
    stop = core.events[1]
    assert (stop.origin, stop.action, stop.extra) == ("loss", "stopped", {"cause": "on_nonfinite='stop'"})
    assert stop.message == (
        "GradGuard stopped the run at step 2: on_nonfinite='stop'; the last fault's origin 'loss'. Next: the forward "
        f"pass or the loss broke: {NEXT}."
    )
    assert core.skipped_steps == 2 and core.nonfinite_steps == 2


def test_skipped_spikes_are_counted_reported_and_escalate_with_no_origin() -> None:
    loop = Loop(skip_spikes=6.0, spike_warmup=5, max_consecutive_skips=3)
    loop.faults.update({8: 1000.0, 10: 1000.0, 11: 1000.0})
    loop.run(12)
    spikes = [e for e in loop.guard.events if e.kind == "spike_skipped"]
    assert [e.step for e in spikes] == [8, 10, 11] and loop.guard.spike_skipped_steps == 3
    first = spikes[0]
    z = first.extra["zscore"]
    assert (first.action, first.optimizer_idx, first.origin, first.layers) == ("skipped", 0, None, ())
    assert first.message == (
        f"GradGuard: skipped step 8: its total norm {first.value:.4g} (or its loss) is {z:.1f} standard deviations "
        "above its rolling statistics (skip_spikes)."
    )
    assert z > 6.0 and loop.guard.consecutive_skips == 2
    loop.faults[12] = 1000.0
    with pytest.raises(NonFiniteGradientError, match=r"^GradGuard: 3 consecutive optimizer steps were skipped "):
        loop.one()
    last, stop = loop.guard.events[-2:]
    assert (stop.kind, stop.step, stop.origin, stop.action) == ("stopped", 12, None, "raised")
    assert (last.kind, last.step) == ("spike_skipped", 12) and stop.value == last.value  # the last fault's norm
    assert stop.message == (
        "GradGuard stopped the run at step 12: 3 consecutive skipped steps (max_consecutive_skips=3); the last "
        f"fault's origin unknown. Next: {NEXT}."
    )


def test_one_skip_too_many_is_said_in_the_singular() -> None:
    model = MLP()
    core = GuardCore(model, max_consecutive_skips=1)
    with pytest.raises(NonFiniteGradientError) as info:
        _run(core, model, 3, {1: 2})
    assert str(info.value).startswith(
        "GradGuard: 1 consecutive optimizer step was skipped (max_consecutive_skips=1); the run is not recovering. "
        "Last: GradGuard: non-finite gradient at step 1"
    )
    fault, stop = core.events
    assert info.value.event == fault and (fault.kind, fault.step, stop.kind) == ("nonfinite", 1, "stopped")


def test_a_step_skipped_on_a_flag_on_the_host_names_its_optimizer_and_flag() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    recorded: list[GradEvent] = []
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    fault = _fault(step=7, optimizer_idx=2, params=[p])
    verdict = Verdict(False, False, False, skips=("spike_skip",))  # no component words it: the policy's event
    event, skipped = policy.decide(verdict, 40.0, lambda: fault, lambda e: recorded.append(e) or e)
    assert skipped and p.grad is None and recorded == [event]
    assert event == GradEvent(
        "skipped", step=7, optimizer_idx=2, action="skipped", message="GradGuard: skipped step 7 (spike_skip).",
    )  # fmt: skip
    assert event.extra == {"flag": "spike_skip"}  # GradEvent's equality leaves extra out
    assert (policy.skipped_steps, policy.spike_skipped_steps, policy.consecutive_skips) == (1, 1, 1)
    assert policy.skipped_by == {"spike_skip": 1}


def test_a_step_skipped_on_a_flag_records_the_components_event_and_counts_its_first_flag() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    asked: list[str] = []
    mine = GradEvent("mine", step=7, message="mine", action="skipped")
    verdict = Verdict(False, False, False, skips=("mine_skip", "spike_skip"))  # both raised: the first counts
    event, skipped = policy.decide(
        verdict, 40.0, lambda: _fault(7, 0, [p]), lambda e: e, lambda flag: asked.append(flag) or mine
    )
    assert skipped and event is mine and asked == ["mine_skip"]
    assert policy.skipped_by == {"mine_skip": 1} and policy.spike_skipped_steps == 0
    assert policy.state_dict()["skipped_by"] == {"mine_skip": 1}


def test_a_flag_raised_with_a_fault_is_the_faults_step_not_a_flag_skip() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    verdict = Verdict(True, False, False, skips=("spike_skip",))
    assert verdict.nonfinite and not verdict.skipped_by_flag and not verdict.finite
    assert Verdict(False, False, False, skips=("spike_skip",)).skipped_by_flag
    assert not Verdict(False, False, False).skipped_by_flag
    assert policy.skipped_by == {}


def _fault(step: int, optimizer_idx: int, params: list[torch.Tensor]) -> Any:
    from lightning_gradguard.core.decide import Fault

    return Fault(step=step, total=torch.tensor(40.0), norms=torch.tensor([40.0]), owners=[0], layout=None,  # type: ignore[arg-type]
                 params=params, optimizer_idx=optimizer_idx)  # fmt: skip


# ------------------------------------------------------------------ the counters of a checkpoint
def test_every_counter_comes_back_from_a_checkpoint() -> None:
    loop = Loop(skip_spikes=6.0, spike_warmup=5, max_consecutive_skips=10)
    loop.faults.update({6: "nan", 8: 1000.0, 9: "nan"})
    loop.run(10)  # a streak of two skips in progress at the end
    state = loop.guard.state_dict()
    counters = {"skipped_steps": 3, "nonfinite_steps": 2, "consecutive_skips": 2, "skipped_by": {"spike_skip": 1}}
    assert {k: state[k] for k in counters} == counters
    state = {**state, "amp_overflow_steps": 4, "max_total_norm": 12.5}  # as an fp16 run would have them
    resumed = GuardCore(nn.Linear(4, 1), skip_spikes=6.0)
    resumed.load_state_dict(state)
    got = resumed.state_dict()
    for key in [*counters, "amp_overflow_steps", "max_total_norm", "origins"]:
        assert got[key] == state[key], key
    assert (resumed.consecutive_skips, resumed.amp_overflow_steps, resumed.spike_skipped_steps) == (2, 4, 1)


def test_a_checkpoint_of_0_3_0_gives_its_spike_count_to_the_spike_flag() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    policy.load_state_dict({"skipped_steps": 5, "spike_skipped_steps": 3})
    assert policy.skipped_by == {"spike_skip": 3} and policy.spike_skipped_steps == 3
    policy.load_state_dict({"skipped_by": {"mine": 2}, "spike_skipped_steps": 0})
    assert policy.skipped_by == {"mine": 2}


def test_counters_missing_from_an_old_checkpoint_start_at_zero() -> None:
    guard = GuardCore(nn.Linear(4, 1), skip_spikes=6.0)
    guard.load_state_dict({})
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.consecutive_skips, guard.amp_overflow_steps,
            guard.spike_skipped_steps, guard.max_total_norm, guard.origins) == (0, 0, 0, 0, 0, 0.0, {})  # fmt: skip


# ------------------------------------------------------------------ DeviceSkip
def _fused(value: float) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), value)
    return p, torch.optim.AdamW([p], lr=0.1, fused=True)


def test_device_skip_sets_a_float32_flag_of_one_whatever_the_flags_sum_and_dtype() -> None:
    p, opt = _fused(math.nan)
    skip = DeviceSkip()
    skip.arm(opt, torch.tensor(2.0, dtype=torch.float64))  # two flags raised (or two ranks), summed in float64
    # the fused kernels skip only on found_inf == 1.0: the sum is clamped to 1, in float32
    assert opt.found_inf.dtype == torch.float32 and opt.found_inf.item() == 1.0  # type: ignore[attr-defined]
    opt.step()
    assert p.tolist() == [1.0, 1.0] and not hasattr(opt, "found_inf")


def test_a_copy_of_a_device_skip_works_on_its_own() -> None:
    _, opt = _fused(math.nan)
    skip = DeviceSkip()
    skip.arm(opt, torch.tensor(1.0))
    copy = pickle.loads(pickle.dumps(skip))  # bound to no optimizer
    p2, opt2 = _fused(math.nan)
    copy.arm(opt2, torch.tensor(1.0))
    opt2.step()
    assert p2.tolist() == [1.0, 1.0] and not hasattr(opt2, "found_inf")
    copy.remove()
    assert hasattr(opt, "found_inf")  # the original's arming is its own
    opt.step()
    assert not hasattr(opt, "found_inf")


# ------------------------------------------------------------------ the policy's other events and counts
def test_an_fp16_overflow_is_the_scalers_business_recorded_and_counted() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), math.inf)
    fault = _fault(step=9, optimizer_idx=1, params=[p])
    event, skipped = policy.decide(Verdict(True, False, True), math.inf, lambda: fault, lambda e: e)
    assert not skipped and p.grad is not None  # the GradScaler skips it, not the guard
    assert event == GradEvent(
        "amp_overflow", step=9, value=math.inf, optimizer_idx=1, action="none",
        message="GradGuard: fp16 overflow at step 9; the GradScaler skips this step and lowers its scale.",
    )  # fmt: skip
    assert (policy.amp_overflow_steps, policy.nonfinite_steps, policy.skipped_steps) == (1, 0, 0)


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_a_nan_loss_under_a_gradscaler_is_skipped_by_it_under_warn_and_skip(policy: str) -> None:
    loop = Loop(scaler=True, on_nonfinite=policy)
    loop.faults[3] = "loss"
    loop.run(5)
    loop.guard.flush()
    (event,) = [e for e in loop.guard.events if e.kind == "nonfinite"]
    assert (event.step, event.origin, event.action) == (3, "loss", "skipped by the GradScaler")
    assert loop.guard.skipped_steps == 0 and loop.guard.nonfinite_steps == 1


def test_a_total_norm_that_overflows_has_no_origin_and_is_counted_as_unknown() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    guard = GuardCore(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # each tensor's norm is finite (1.5e19); their float32 total is not
        for p in model.parameters():
            p.grad = torch.full_like(p, 1.5e19)
        assert guard.step(opt).skipped
    assert [(e.origin, e.layers, e.value) for e in guard.events] == [(None, (), math.inf)] * 2
    assert guard.events[0].message == (
        "GradGuard: non-finite gradient at step 0 (total norm inf), origin unknown. Step skipped."
    )
    assert guard.origins == {"unknown": 2}


def test_origins_are_counted_per_layer() -> None:
    model = MLP()
    core = GuardCore(model)
    _run(core, model, 6, {1: 1, 2: 0, 4: 1})
    assert core.origins == {"b": 2, "a": 1}


class _Declares(torch.optim.SGD):
    """An optimizer that says its step honours found_inf, but is not fused."""

    _step_supports_amp_scaling = True


class _Fused(torch.optim.Optimizer):
    """An optimizer fused by its defaults that never says its step honours found_inf."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"fused": True})


def test_only_a_fused_optimizer_that_honours_found_inf_skips_on_the_device() -> None:
    p = [nn.Parameter(torch.ones(2))]
    assert can_skip_on_device(torch.optim.AdamW(p, fused=True))
    assert not can_skip_on_device(_Declares(p, lr=0.1))
    assert not can_skip_on_device(_Fused(p))


def test_the_policys_counters_are_saved_under_their_names() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    policy.skipped_steps, policy.nonfinite_steps, policy.consecutive_skips = 5, 4, 2
    policy.amp_overflow_steps, policy.max_total_norm, policy.origins = 3, 7.5, {"b": 4}
    assert policy.state_dict() == {"skipped_steps": 5, "nonfinite_steps": 4, "consecutive_skips": 2,
                                   "amp_overflow_steps": 3, "max_total_norm": 7.5, "origins": {"b": 4}}  # fmt: skip


def test_a_fault_in_a_layer_the_first_pass_did_not_run_says_its_origin_is_uncertain() -> None:
    torch.manual_seed(0)
    model = Branchy()  # `late` runs only when asked: not in the forward order recorded on the first pass
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core = GuardCore(model, track_timesteps=False)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    core.step(opt)
    opt.zero_grad()
    model(x, branch=True, poison_at="late").sum().backward()
    event = core.step(opt).event
    assert event is not None and event.extra == {"origin_certain": False}
    assert event.message == (
        "GradGuard: non-finite gradient at step 1 (total norm nan), origin 'late'; layers: a, late. Step skipped. "
        "(Origin uncertain: late did not run in the recorded forward pass, so their place in the order is unknown.)"
    )


def test_the_skips_outside_the_decision_are_counted_once_and_a_settled_one_restarts_the_streak() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    policy.skipped_steps, policy.consecutive_skips = 5, 3
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    policy.skip_unmeasured([p])  # a batch of the skip list: counted, the streak left as it is
    assert (p.grad, policy.skipped_steps, policy.consecutive_skips) == (None, 6, 3)
    p.grad = torch.ones(2)
    policy.skip_settled([p], already=False)  # a rollback of a finite step: counted, the streak starts again
    assert (p.grad, policy.skipped_steps, policy.consecutive_skips) == (None, 7, 0)
    p.grad, policy.consecutive_skips = torch.ones(2), 2
    policy.skip_settled([p], already=True)  # a rollback of a step the policy skipped: counted already
    assert (p.grad, policy.skipped_steps, policy.consecutive_skips) == (None, 7, 0)
    policy.consecutive_skips = 4
    policy.restart_streak()
    assert (policy.skipped_steps, policy.consecutive_skips) == (7, 0)


class _TwoLate(nn.Module):
    """`late1` and `late2` run only when asked: both missing from the forward order of the first pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.late1, self.late2, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, branch: bool = False) -> torch.Tensor:
        h = self.a(x)
        if branch:
            h = self.late2(self.late1(h)) * math.nan
        return self.b(h)  # type: ignore[no-any-return]


def test_an_uncertain_origin_names_every_layer_that_did_not_run_in_the_first_pass() -> None:
    torch.manual_seed(0)
    model = _TwoLate()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core = GuardCore(model, track_timesteps=False)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    core.step(opt)
    opt.zero_grad()
    model(x, branch=True).sum().backward()
    event = core.step(opt).event
    assert event is not None and event.extra == {"origin_certain": False}
    assert event.message.endswith(
        "(Origin uncertain: late1, late2 did not run in the recorded forward pass, so their place in the order is "
        "unknown.)"
    )


def test_a_fault_without_a_total_norm_is_reported_as_nan() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    core = GuardCore(model)
    model(torch.ones(1, 2)).sum().backward()
    core.step(opt)
    layout = core.layers.layout(opt)
    fault = Fault(step=1, total=torch.empty(0), norms=torch.empty(0), owners=[], layout=layout, params=[],
                  optimizer_idx=0)  # fmt: skip
    event, skipped = core.policy.decide(Verdict(False, True, False), math.nan, lambda: fault, lambda e: e)
    assert event is not None and skipped and math.isnan(event.value) and event.origin == "loss"


def test_a_sharded_models_non_finite_loss_is_named_from_the_flags_shared_with_its_norms(mesh: Any) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    for name, p in list(model.named_parameters()):
        setattr(model, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GuardCore(model)
    reports = []
    for step in range(3):
        opt.zero_grad()
        loss = model(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])).full_tensor().pow(2).mean()
        guard.observe_loss(loss * math.nan if step == 1 else loss)  # the loss flag rides in the shard all-reduce
        (loss * math.nan if step == 1 else loss).backward()
        reports.append(guard.step(opt))
    assert [(r.skipped, r.nonfinite) for r in reports] == [(False, False), (True, True), (False, False)]
    event = reports[1].event
    assert event is not None and (event.kind, event.origin, event.layers) == ("nonfinite", "loss", ("weight", "bias"))


def test_disarming_an_optimizer_whose_found_inf_is_gone_already_is_quiet() -> None:
    _, opt = _fused(1.0)
    skip = DeviceSkip()
    skip.arm(opt, torch.tensor(0.0))
    del opt.found_inf  # removed by someone else (a GradScaler's own bookkeeping, a user)
    skip.disarm(opt)
    assert not hasattr(opt, "found_inf") and skip._armed == {}


def test_the_largest_total_norm_starts_at_zero_and_follows_the_finite_steps() -> None:
    policy = StepPolicy("skip", 25, LayerMap())
    assert policy.max_total_norm == 0.0
    for total in (0.25, math.inf, 0.5, 0.125):
        healthy = Verdict(False, False, False)
        assert policy.decide(healthy, total, lambda: _fault(0, 0, []), lambda e: e) == (None, False)
    assert policy.max_total_norm == 0.5


# ------------------------------------------------------------------ device_flags under sharding
def _sharded(amp_found: bool | None, inv_scale: bool, loss_bad: float = 0.0, overflow: float = 0.0) -> Any:
    """A sharded step's measurement (the flags already summed with the norms' all-reduce; the overflow
    found on the global total is a bool, as ``measure_step`` makes it)."""
    from lightning_gradguard.core.measure import Measurement

    zero = torch.zeros(())
    return Measurement(
        grads=[], owners=[], norms=torch.ones(1), total=torch.ones(()), finite=torch.tensor(True),
        inv_scale=torch.tensor(0.5) if inv_scale else None,
        amp_found=None if amp_found is None else torch.tensor(amp_found), loss_scale=None, sharded=True,
        single_group=True, zero=zero, reductions=[], shared_flags=torch.tensor([loss_bad, overflow]),
    )  # fmt: skip


def test_a_sharded_step_under_a_gradscaler_takes_the_overflow_from_the_scaler_s_global_flag() -> None:
    """Sharded gradients still scaled (a fused optimizer under fp16): the overflow flag is the
    GradScaler's, found on the global total, not the summed per-rank one; each flag a float32 0-d."""
    from lightning_gradguard.core.decide import device_flags

    for found in (True, False):
        flags = device_flags(_sharded(found, inv_scale=True, loss_bad=2.0, overflow=0.0), None)
        assert [float(f) for f in flags] == [0.0, 2.0, float(found)]
        assert all(f.dtype == torch.float32 and f.dim() == 0 for f in flags)
    # not scaled any more (or no scaler): the summed flags as they came
    assert [float(f) for f in device_flags(_sharded(True, inv_scale=False, overflow=3.0), None)] == [0.0, 0.0, 3.0]
    assert [float(f) for f in device_flags(_sharded(None, inv_scale=True, overflow=3.0), None)] == [0.0, 0.0, 3.0]
