"""The rules of a snapshot (core/snapshot.py), each checked on its own: what `make mutate` showed no test held.

A snapshot restores optimizer state that is gone by recreating it (a copy, never the snapshot's own tensor),
keeps its files where it was told (creating the folders), survives its file being removed already, and
copies into the host buffers of the snapshot it replaces only when they fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.core.snapshot import RestoreError, Snapshot, SnapshotRing, Targets, local_tensor
from tests.helpers import assert_same_state


def _trained(steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(steps):
        _step(model, opt)
    return model, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()


def _moments(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def test_optimizer_state_that_is_gone_is_recreated_from_the_snapshot_as_a_copy_of_it() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    kept = _moments(opt)
    opt.state.clear()  # the state is gone (a reset optimizer): nothing to copy into
    snap.restore(targets)
    assert_same_state(_moments(opt), kept)
    for p in model.parameters():
        for value in opt.state[p].values():
            assert value.device == p.device
    _step(model, opt)  # the recreated state is the optimizer's own: training moves it, not the snapshot
    opt.state.clear()
    snap.restore(targets)
    assert_same_state(_moments(opt), kept)


def test_state_of_another_shape_is_replaced_not_copied_into() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    kept = _moments(opt)
    weight = model.weight
    opt.state[weight]["exp_avg"] = torch.zeros(7)  # a tensor that no longer fits
    opt.state[weight]["stale"] = torch.ones(1)  # a key the snapshot does not have: removed
    snap.restore(targets)
    assert_same_state(_moments(opt), kept)


def test_state_that_did_not_exist_at_the_snapshot_is_removed() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    targets = Targets(model, [opt])
    snap = Snapshot.take(0, targets)  # before the first step: no state
    _step(model, opt)
    snap.restore(targets)
    assert dict(opt.state) == {}
    assert opt.state_dict()["state"] == {}


def test_snapshots_on_disk_create_their_folders_and_leave_one_file_each(tmp_path: Path) -> None:
    model, opt = _trained()
    folder = tmp_path / "runs" / "snapshots"  # neither exists yet
    ring = SnapshotRing(keep=2, directory=str(folder), rank=3)
    targets = Targets(model, [opt])
    for step in (2, 4, 6):
        ring.take(step, targets)
    assert sorted(p.name for p in folder.iterdir()) == [
        "gradguard-snapshot-rank3-step4.pt", "gradguard-snapshot-rank3-step6.pt",
    ]  # fmt: skip
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)
    ring.snapshots[-1].restore(targets)
    assert_same_state(dict(model.state_dict()), weights)


def test_a_snapshot_whose_file_is_already_gone_is_dropped_quietly_but_never_restored(tmp_path: Path) -> None:
    model, opt = _trained()
    ring = SnapshotRing(keep=1, directory=str(tmp_path), rank=0)
    targets = Targets(model, [opt])
    first = ring.take(2, targets)
    assert first.path is not None
    Path(first.path).unlink()  # removed by someone else (a cleaned scratch disk)
    with pytest.raises(RestoreError, match=r"could not read the snapshot of step 2 at .*step2\.pt"):
        first.restore(targets)
    ring.take(4, targets)  # drops the first: its file is gone already, and that is no error
    assert [s.step for s in ring.snapshots] == [4]
    ring.clear()
    assert list(tmp_path.iterdir()) == [] and len(ring) == 0


def test_the_dropped_snapshots_host_buffers_are_reused_only_where_they_fit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # four tensors of four shapes
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)
    ring = SnapshotRing(keep=1)
    targets = Targets(model, [opt])
    old = ring.take(1, targets)
    _step(model, opt)
    new = ring.take(2, targets)
    for name, t in targets.model_tensors():  # every buffer reused, and current
        assert new.tensors[name] is old.tensors[name] and torch.equal(new.tensors[name], t)
        assert new.tensors[name] is not t  # a copy, never the live tensor
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert new.optim[0]["state"][i][key] is old.optim[0]["state"][i][key], (i, key)
            assert torch.equal(new.optim[0]["state"][i][key], opt.state[p][key])
    # a model whose shapes changed gets new buffers, not the old ones reshaped
    other = nn.Linear(5, 2)
    third = ring.take(3, Targets(other))
    assert third.tensors["p:weight"] is not new.tensors["p:0.weight"]
    assert torch.equal(third.tensors["p:weight"], other.weight)


def test_snapshots_on_disk_reuse_no_buffers() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    old = Snapshot.take(2, targets)
    old.path = "elsewhere.pt"  # as a snapshot moved to disk: its tensors are no longer its own
    new = Snapshot.take(3, targets, reuse=old)
    assert new.tensors["p:weight"] is not old.tensors["p:weight"]
    assert new.optim[0]["state"][0]["exp_avg"] is not old.optim[0]["state"][0]["exp_avg"]


def test_a_snapshot_keeps_its_position_and_learning_rate_scale() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    assert (Snapshot.take(0, targets).position, Snapshot.take(0, targets).lr_scale) == (None, 1.0)
    ring = SnapshotRing(keep=2)
    assert (ring.take(0, targets).position, ring.snapshots[0].lr_scale) == (None, 1.0)
    snap = ring.take(5, targets, position=(1, 7), lr_scale=0.25)
    assert (snap.step, snap.position, snap.lr_scale) == (5, (1, 7), 0.25)


def test_drop_after_forgets_the_newer_snapshots_and_their_files_only(tmp_path: Path) -> None:
    model, opt = _trained()
    ring = SnapshotRing(keep=4, directory=str(tmp_path))
    targets = Targets(model, [opt])
    for step in (1, 2, 3, 4):
        ring.take(step, targets)
    ring.drop_after(1)
    assert [s.step for s in ring.snapshots] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gradguard-snapshot-rank0-step1.pt", "gradguard-snapshot-rank0-step2.pt",
    ]  # fmt: skip
    ring.snapshots[0].restore(targets)  # the kept ones still restore


class Counter:
    """A scheduler-like object (what Targets.schedulers takes) whose state_dict hands out its own list,
    which its step() grows in place, as a user's scheduler may."""

    def __init__(self) -> None:
        self.state: dict[str, list[int]] = {"history": []}

    def step(self) -> None:
        self.state["history"].append(len(self.state["history"]))

    def state_dict(self) -> dict[str, list[int]]:
        return self.state

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.state = state


def test_a_snapshot_is_a_copy_of_scheduler_state_handed_out_by_reference_and_restores_twice() -> None:
    model, opt = _trained()
    sched = Counter()
    sched.step()
    targets = Targets(model, [opt], schedulers=[sched])
    snap = Snapshot.take(2, targets)
    for _ in range(2):
        sched.step()
        sched.step()
        snap.restore(targets)
        assert sched.state == {"history": [0]}


def test_a_tensor_learning_rate_is_restored_and_the_snapshot_keeps_its_own() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    targets = Targets(model, [opt], schedulers=[sched])
    _step(model, opt)
    sched.step()
    snap = Snapshot.take(1, targets)
    for _ in range(2):
        for _ in range(3):  # the scheduler writes the tensor learning rate in place
            _step(model, opt)
            sched.step()
        snap.restore(targets)
        assert torch.equal(opt.param_groups[0]["lr"], torch.tensor(0.05))


def test_non_tensor_optimizer_state_is_copied_both_ways() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, history_size=4)  # state: ints, floats, lists of tensors
    x = torch.randn(8, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    targets = Targets(model, [opt])
    snap = Snapshot.take(1, targets)
    p = model.weight
    kept = {k: (list(v) if isinstance(v, list) else v) for k, v in opt.state[p].items()}
    assert isinstance(kept["n_iter"], int) and isinstance(kept["old_dirs"], list) and kept["old_dirs"]
    for _ in range(2):
        opt.step(closure)  # grows the lists in place, counts on
        snap.restore(targets)
        now = opt.state[p]
        assert now["n_iter"] == kept["n_iter"] and now["func_evals"] == kept["func_evals"]
        assert len(now["old_dirs"]) == len(kept["old_dirs"])
        assert all(torch.equal(a, b) for a, b in zip(now["old_dirs"], kept["old_dirs"], strict=True))


def test_buffers_are_kept_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    targets = Targets(model)
    model(torch.randn(8, 3))
    snap = Snapshot.take(1, targets)
    assert {n for n in snap.tensors if n.startswith("b:")} == {
        "b:1.running_mean", "b:1.running_var", "b:1.num_batches_tracked",
    }  # fmt: skip
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 3) + 3.0)
    snap.restore(targets)
    assert_same_state(dict(model.state_dict()), kept)


def test_a_state_that_did_not_exist_is_removed_again_on_every_restore() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    targets = Targets(model, [opt])
    snap = Snapshot.take(0, targets)
    snap.restore(targets)  # no state then, none now
    _step(model, opt)
    snap.restore(targets)
    snap.restore(targets)
    assert dict(opt.state) == {}


def test_a_scaler_the_snapshot_did_not_keep_is_left_alone() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)  # no scaler then
    targets.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    snap.restore(targets)
    assert targets.scaler.get_scale() == 8.0


def test_a_scheduler_added_after_the_snapshot_keeps_its_state() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    sched = Counter()
    sched.step()
    targets.schedulers = [sched]
    snap.restore(targets)
    assert sched.state == {"history": [0]}


# ------------------------------------------------------------------ what cannot be restored, said exactly
def test_a_changed_model_is_named_by_the_first_five_tensors_that_changed() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    model.add_module("extra", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(RestoreError) as info:
        snap.restore(targets)
    assert str(info.value) == (
        "GradGuard cannot restore the snapshot of step 2: the model's parameters and buffers changed since it was "
        "taken (extra.0.bias, extra.0.weight, extra.1.bias, extra.1.weight, extra.2.bias)."
    )
    del model.extra
    model.register_buffer("counts", torch.zeros(2))  # a buffer is named the same way
    with pytest.raises(RestoreError, match=r"changed since it was taken \(counts\)\.$"):
        snap.restore(targets)


@pytest.mark.parametrize(("replacement", "now"), [
    (lambda: nn.Parameter(torch.zeros(2, 4)), "(2, 4) torch.float32"),
    (lambda: nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)), "(2, 3) torch.float64"),
])  # fmt: skip
def test_a_reshaped_or_recast_parameter_is_refused_by_name(replacement: Any, now: str) -> None:
    model, _ = _trained()
    targets = Targets(model, [])
    snap = Snapshot.take(2, targets)
    model.weight = replacement()
    with pytest.raises(RestoreError) as info:
        snap.restore(targets)
    assert str(info.value) == (
        f"GradGuard cannot restore the snapshot of step 2: weight is {now} now, (2, 3) torch.float32 in the snapshot."
    )


def test_a_changed_optimizer_is_refused_with_its_counts() -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    opt.param_groups[0]["params"].append(nn.Parameter(torch.zeros(1)))  # a parameter more, in the same group
    with pytest.raises(RestoreError) as info:
        snap.restore(targets)
    assert str(info.value) == (
        "GradGuard cannot restore the snapshot of step 2: AdamW has 3 parameters in 1 groups, the snapshot 2 in 1."
    )
    targets.optimizers = []
    with pytest.raises(RestoreError) as info:
        snap.restore(targets)
    assert str(info.value) == "GradGuard cannot restore the snapshot of step 2: it holds 1 optimizers, the run has 0."


def test_a_snapshot_counts_the_bytes_it_holds() -> None:
    model, opt = _trained()
    snap = Snapshot.take(2, Targets(model, [opt]))
    params = sum(p.numel() for p in model.parameters()) * 4
    # AdamW: exp_avg and exp_avg_sq per parameter (float32), and its step (a 0-d float32 tensor)
    assert snap.nbytes == params + 2 * params + 2 * 4


def test_local_tensor_is_detached() -> None:
    p = nn.Parameter(torch.ones(2))
    local = local_tensor(p)
    assert not local.requires_grad and local.data_ptr() == p.data_ptr()


# ------------------------------------------------------------------ sharded tensors (a one-process mesh)
def test_sharded_parameters_are_kept_as_local_shards_and_gone_state_comes_back_sharded(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    for name, p in list(model.named_parameters()):
        setattr(model, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])).full_tensor().pow(2).mean().backward()
    opt.step()
    targets = Targets(model, [opt])
    snap = Snapshot.take(1, targets)
    assert all(type(t) is torch.Tensor for t in snap.tensors.values())  # the local shards, not DTensors
    assert all(type(v) is torch.Tensor for s in snap.optim[0]["state"] for v in s.values())
    kept = {n: local_tensor(t).clone() for n, t in targets.model_tensors()}
    moments = {k: local_tensor(v).clone() for k, v in opt.state[model.bias].items()}
    opt.step()
    opt.state.clear()
    checks: list[bool] = []  # run_check of each DTensor made: True would be a collective per tensor
    from_local = DTensor.from_local
    monkeypatch.setattr(DTensor, "from_local", lambda *a, **k: checks.append(k.get("run_check", True)) or
                        from_local(*a, **k))  # fmt: skip
    snap.restore(targets)
    monkeypatch.undo()
    assert checks == [False] * 4  # the moments of weight and bias: a restore is a local copy, no collective
    assert all(torch.equal(local_tensor(t), kept[n]) for n, t in targets.model_tensors())
    for p in (model.weight, model.bias):  # recreated as DTensors placed like their parameter; the step a tensor
        state = opt.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == (Shard(0),)
        assert isinstance(state["exp_avg_sq"], DTensor) and state["exp_avg_sq"].device_mesh == mesh
        assert type(state["step"]) is torch.Tensor
    assert_same_state({k: local_tensor(v) for k, v in opt.state[model.bias].items()}, moments)


def test_state_that_is_gone_is_recreated_on_its_parameters_device() -> None:
    from lightning_gradguard.core.snapshot import _new_state

    like = torch.empty(2, device="meta")  # a device other than the snapshot's host copy
    made = _new_state(torch.ones(2), like)
    assert made.device == like.device and made.shape == (2,)


def test_a_scaler_and_guard_state_handed_out_by_reference_are_copied_and_restore_twice() -> None:
    model, opt = _trained()
    scaler, guard = Counter(), Counter()  # no is_enabled(): a scaler-like object is on
    scaler.step()
    guard.step()
    targets = Targets(model, [opt], scaler=scaler, guard_state=guard.state_dict, load_guard_state=guard.load_state_dict)
    snap = Snapshot.take(2, targets)
    assert snap.scaler == {"history": [0]} and snap.guard == {"history": [0]}
    for _ in range(2):
        scaler.step()
        guard.step()
        snap.restore(targets)
        assert scaler.state == {"history": [0]} and guard.state == {"history": [0]}


def test_a_disabled_gradscaler_is_not_kept() -> None:
    model, opt = _trained()
    snap = Snapshot.take(2, Targets(model, [opt], scaler=torch.amp.GradScaler("cpu", enabled=False)))
    assert snap.scaler is None


def test_nested_non_tensor_optimizer_state_is_copied_both_ways() -> None:
    model, opt = _trained()
    p = model.weight
    opt.state[p]["memo"] = {"seen": [1]}  # a user's optimizer may keep nested, mutable state
    targets = Targets(model, [opt])
    snap = Snapshot.take(2, targets)
    for _ in range(2):
        opt.state[p]["memo"]["seen"].append(2)  # mutated in place
        snap.restore(targets)
        assert opt.state[p]["memo"] == {"seen": [1]}


def test_a_reused_buffer_that_was_not_a_tensor_is_not_copied_into() -> None:
    model, opt = _trained()
    p = model.weight
    ring = SnapshotRing(keep=1)
    targets = Targets(model, [opt])
    opt.state[p]["extra"] = 1.0
    ring.take(2, targets)
    opt.state[p]["extra"] = torch.ones(2)  # a tensor now, where the dropped snapshot held a float
    snap = ring.take(3, targets)  # reuses the dropped snapshot's buffers where they are tensors that fit
    index = [q for g in opt.param_groups for q in g["params"]].index(p)
    assert ring.snapshots == [snap] and torch.equal(snap.optim[0]["state"][index]["extra"], torch.ones(2))


def test_a_ring_keeps_two_snapshots_by_default() -> None:
    model, opt = _trained()
    ring = SnapshotRing()
    for step in range(4):
        ring.take(step, Targets(model, [opt]))
    assert [s.step for s in ring.snapshots] == [2, 3]


def test_a_snapshots_copy_of_a_transposed_tensor_is_contiguous() -> None:
    model = nn.Linear(3, 2)
    model.weight = nn.Parameter(torch.randn(3, 2).t())  # a non-contiguous parameter
    snap = Snapshot.take(0, Targets(model))
    assert not model.weight.is_contiguous() and snap.tensors["p:weight"].is_contiguous()
    assert torch.equal(snap.tensors["p:weight"], model.weight)


class _Payload:
    """Not a tensor: a snapshot file that holds it was not written by a snapshot."""


def test_a_snapshot_file_is_loaded_as_weights_only(tmp_path: Path) -> None:
    model, opt = _trained()
    targets = Targets(model, [opt])
    ring = SnapshotRing(keep=1, directory=str(tmp_path))
    snap = ring.take(2, targets)
    assert snap.path is not None
    torch.save({"tensors": _Payload(), "optim": []}, snap.path)  # replaced by a file that pickles an object
    with pytest.raises(RestoreError, match=r"^GradGuard could not read the snapshot of step 2 at "):
        snap.restore(targets)


def test_optimizer_state_kept_off_its_parameters_device_comes_back_where_it_was() -> None:
    from lightning_gradguard.core.snapshot import _restore_optimizer

    p = nn.Parameter(torch.empty(2, device="meta"))  # the parameter on another device than its (offloaded) state
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.state[p]["momentum_buffer"] = torch.ones(3)  # on the host, of another shape than the snapshot's
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    _restore_optimizer(opt, {"groups": groups, "state": [{"momentum_buffer": torch.zeros(2)}]}, 5)
    buf = opt.state[p]["momentum_buffer"]
    assert buf.device.type == "cpu" and torch.equal(buf, torch.zeros(2))
