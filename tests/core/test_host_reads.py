"""The host-read detector (tests/hostreads.py) sees every device-to-host read, whatever makes it, once;
on CUDA the driver agrees with it (``torch.cuda.set_sync_debug_mode``).

Issue 33: ``torch.equal(found.to("cpu"), ...)`` added to ``DeviceSkip.arm`` (a real sync on a GPU)
survived a detector that knew seven Tensor method names, called from package frames only.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils._mode_utils import no_dispatch

from lightning_gradguard import GuardCore, NormClip
from lightning_gradguard.core.decide import DeviceSkip
from lightning_gradguard.core.hostread import HostRead
from tests.hostreads import copy_waits, host_reads, host_reads_from_the_package

HERE = "tests/core/test_host_reads.py:"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync is real on a CUDA device only")


def _if(t: Tensor) -> int:
    return 1 if t else 0


READS: dict[str, tuple[Callable[[Tensor], Any], str]] = {
    "tolist": (lambda t: t.tolist(), "Tensor.tolist"),  # dispatches no aten op on CPU
    "numpy": (lambda t: t.numpy(), "Tensor.numpy"),  # nor this (a detach only)
    "np.asarray": (lambda t: np.asarray(t), "Tensor.__array__"),  # __array__ calls numpy(): one read
    "repr": (lambda t: repr(t), "Tensor.__repr__"),  # prints with modes off, via tolist and item: one read
    "f-string": (lambda t: f"{t}", "Tensor.__repr__"),
    "cpu": (lambda t: t.cpu(), "Tensor.cpu"),  # an explicit move to the host, counted on every device
    "item": (lambda t: t[0].item(), "Tensor.item"),  # the wrapper and _local_scalar_dense: one read
    "bool": (lambda t: bool(t[0]), "Tensor.__bool__"),
    "if": (lambda t: _if(t[0]), "Tensor.__bool__"),
    "float": (lambda t: float(t[0]), "Tensor.__float__"),
    "math.isfinite": (lambda t: math.isfinite(t[0]), "Tensor.__float__"),
    "int": (lambda t: int(t[0]), "Tensor.__int__"),
    "index": (lambda t: [1, 2, 3][t[0].long()], "Tensor.__index__"),
    "format": (lambda t: f"{t[0]:.2f}", "Tensor.item"),
    "in": (lambda t: 2.0 in t, "Tensor.item"),
    "no_dispatch": (lambda t: _no_dispatch_item(t), "Tensor.item"),  # the mode is off: the wrapper sees it
    "equal": (lambda t: torch.equal(t, t.to("cpu")), "aten.equal"),  # the mutant
    "allclose": (lambda t: torch.allclose(t, t), "aten.allclose"),
    "is_nonzero": (lambda t: torch.is_nonzero(t[:1]), "aten._local_scalar_dense"),
    "nonzero": (lambda t: t.nonzero(), "aten.nonzero"),
    "where(cond)": (lambda t: torch.where(t > 0), "aten.nonzero"),
    "boolean mask": (lambda t: t[t > 0], "aten.index (boolean mask)"),
    "masked_select": (lambda t: t.masked_select(t > 0), "aten.masked_select"),
    "unique": (lambda t: t.unique(), "aten._unique2"),  # type: ignore[no-untyped-call]
    "repeat_interleave": (lambda t: torch.repeat_interleave(t.long()), "aten.repeat_interleave (no output_size)"),
    "bincount": (lambda t: torch.bincount(t.long()), "aten.bincount"),
}

NOT_READS: dict[str, Callable[[Tensor], Any]] = {
    "arithmetic": lambda t: (t * 2 + 1).sum().sqrt(),
    "where(cond, a, b)": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
    "flags": lambda t: torch.isfinite(t).all().logical_not().float().clamp(max=1.0),
    "to the same device": lambda t: t.to("cpu").to(torch.float64),
    "integer index": lambda t: t[torch.tensor([0, 2])],
    "repeat_interleave with output_size": lambda t: torch.repeat_interleave(t.long(), output_size=3),
    "nonzero_static": lambda t: torch.nonzero_static(t, size=3),
    "to meta": lambda t: t.to("meta") * 2,
    "stack, cat": lambda t: torch.cat([torch.stack([t[0], t[1]]), t]),
    "foreach": lambda t: torch._foreach_norm([t, t]),
}


def _no_dispatch_item(t: Tensor) -> float:
    with no_dispatch():
        return t.sum().item()


@pytest.mark.parametrize("name", list(READS))
def test_every_read_is_seen_once_with_where_it_was_made(name: str) -> None:
    read, what = READS[name]
    t = torch.tensor([1.0, 2.0, 0.0])
    with host_reads() as calls:
        read(t)
    assert [c.what for c in calls] == [what]
    assert calls[0].where.startswith(HERE), calls  # this file's line, not torch's


@pytest.mark.parametrize("name", list(NOT_READS))
def test_work_that_stays_on_the_device_is_not_a_read(name: str) -> None:
    t = torch.tensor([1.0, 2.0, 0.0])
    with host_reads() as calls:
        NOT_READS[name](t)
    assert calls == []


@pytest.mark.parametrize(
    ("src", "dst", "non_blocking", "pinned", "waits"),
    [
        ("cuda:0", "cpu", False, False, True),  # .cpu(), .tolist() on a GPU
        ("cuda:0", "cpu", False, True, True),
        ("cuda:0", "cpu", True, False, True),  # asynchronous in name, but into pageable memory
        ("cuda:0", "cpu", True, True, False),  # the snapshot's pinned non_blocking copy
        ("cpu", "cuda:0", False, False, True),  # a blocking copy to the device synchronizes the stream too
        ("cpu", "cuda:0", True, False, False),
        ("cuda:0", "cuda:1", False, False, False),
        ("cpu", "cpu", False, False, False),
        ("meta", "cpu", False, False, False),
    ],
)
def test_a_copy_is_a_read_when_the_host_waits_for_it(
    src: str, dst: str, non_blocking: bool, pinned: bool, waits: bool
) -> None:
    assert copy_waits(torch.device(src), torch.device(dst), non_blocking, pinned) is waits


def test_the_tensor_methods_are_restored_even_after_an_error() -> None:
    before = dict(vars(torch.Tensor))
    with pytest.raises(ZeroDivisionError), host_reads():
        assert torch.Tensor.tolist is not torch._C.TensorBase.tolist  # wrapped inside
        _ = 1 / 0
    assert dict(vars(torch.Tensor)) == before
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist
    assert not torch._C._len_torch_dispatch_stack()


def test_nested_regions_each_see_every_read_once() -> None:
    t = torch.tensor([1.0, 2.0])
    with host_reads() as outer:
        with host_reads() as inner:
            float(t[0])
            torch.equal(t, t)
        t.tolist()
    assert [c.what for c in inner] == ["Tensor.__float__", "aten.equal"]
    assert [c.what for c in outer] == ["Tensor.__float__", "aten.equal", "Tensor.tolist"]


def test_a_region_counts_its_own_thread_s_reads_not_a_background_thread_s() -> None:
    """The guard's image renderer reads on its own thread, at any time: a step's count must not catch it."""
    t = torch.tensor([1.0, 2.0])
    with host_reads() as calls:
        worker = threading.Thread(target=t.tolist)
        worker.start()
        worker.join()
        t.numpy()
    assert [c.what for c in calls] == ["Tensor.numpy"]


def test_the_package_filter_keeps_the_reads_made_under_package_frames() -> None:
    """For a region that also runs other code (benchmarks/bench.py: a whole Trainer.fit)."""
    read = HostRead()
    read.put("x", torch.ones(2))
    t = torch.ones(2)
    with host_reads_from_the_package() as calls:
        t.tolist()  # this test's own read: not the package's
        torch.equal(t, t)
        read.read()
    assert [c.what for c in calls] == ["Tensor.tolist"]
    assert calls[0].where.startswith("lightning_gradguard/core/hostread.py:")


def _fused_guard() -> tuple[nn.Module, torch.optim.Optimizer, GuardCore]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    return model, opt, GuardCore(model, clip=NormClip(1.0), on_nonfinite="skip", log_every_n_steps=None)


def test_a_sync_added_to_the_device_skip_is_caught_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's surviving mutant, planted from here: the healthy fused step now reads once."""
    arm = DeviceSkip.arm

    def arm_and_compare(self: DeviceSkip, optimizer: torch.optim.Optimizer, flags: Tensor) -> None:
        arm(self, optimizer, flags)
        found = optimizer.found_inf  # type: ignore[attr-defined]
        torch.equal(found.to("cpu"), torch.zeros_like(found))

    model, opt, guard = _fused_guard()
    monkeypatch.setattr(DeviceSkip, "arm", arm_and_compare)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        with host_reads() as calls:
            guard.step(opt)
        opt.step()
        if step > 0:  # the first step learns the layout
            assert [c.what for c in calls] == ["aten.equal"] and calls[0].where.startswith(HERE), calls


# ----------------------------------------------------------------------------- CUDA: the driver agrees
@contextmanager
def _sync_debug(mode: str) -> Iterator[list[str]]:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside, restored after; yields the sync warnings ("warn")."""
    syncs: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def _cuda_guard(optimizer: str, policy: str) -> tuple[nn.Module, torch.optim.Optimizer, GuardCore]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).cuda()
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        if optimizer == "AdamW(fused)"
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    guard = GuardCore(model, clip=NormClip(1.0), on_nonfinite=policy, log_every_n_steps=None)  # type: ignore[arg-type]
    return model, opt, guard


def _cuda_step(model: nn.Module, opt: torch.optim.Optimizer, guard: GuardCore, log: bool) -> Any:
    """One whole guarded step: forward, the loss check, backward, the guard, the optimizer."""
    opt.zero_grad()
    loss = model(torch.randn(8, 4, device="cuda")).pow(2).mean()
    guard.observe_loss(loss)
    loss.backward()
    report = guard.step(opt, log=log)
    opt.step()
    return report


@CUDA
@pytest.mark.parametrize(
    ("optimizer", "policy"),
    [("AdamW(fused)", "skip"), ("AdamW(fused)", "stop"), ("AdamW(fused)", "warn"), ("SGD", "warn")],
)
def test_a_healthy_non_logging_step_never_syncs_on_cuda(optimizer: str, policy: str) -> None:
    model, opt, guard = _cuda_guard(optimizer, policy)
    for _ in range(2):  # the first steps learn the layout and create the optimizer's state
        _cuda_step(model, opt, guard, log=False)
    for _ in range(5):
        with _sync_debug("error"), host_reads() as calls:  # any sync raises, where it is made
            report = _cuda_step(model, opt, guard, log=False)
        assert calls == [] and report.deferred
        assert not hasattr(opt, "found_inf")
    guard.flush()
    assert guard.steps == 7 and guard.skipped_steps == 0


@CUDA
@pytest.mark.parametrize(
    ("optimizer", "policy", "log"),
    [("SGD", "skip", False), ("AdamW(fused)", "skip", True), ("AdamW(fused)", "warn", True)],
)
def test_a_step_that_reads_syncs_exactly_once_on_cuda(optimizer: str, policy: str, log: bool) -> None:
    """The default policy with a non-fused optimizer, and logging steps: the one ``.tolist()`` of
    ``HostRead.read_all``, and no other sync."""
    model, opt, guard = _cuda_guard(optimizer, policy)
    for _ in range(2):
        _cuda_step(model, opt, guard, log=log)
    for _ in range(3):
        with _sync_debug("warn") as syncs, host_reads() as calls:
            report = _cuda_step(model, opt, guard, log=log)
        assert len(syncs) == 1, syncs
        assert [c.what for c in calls] == ["Tensor.tolist"], calls
        assert calls[0].where.startswith("lightning_gradguard/core/hostread.py:")
        assert not report.deferred and not report.skipped
