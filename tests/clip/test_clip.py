"""Clippers against torch.nn.utils and the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard import GuardCore, NormClip, ValueClip
from lightning_gradguard import functional as F


def make_grads(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (5,), (3, 4), (2, 3, 4), (2, 2, 2, 3)]
    return [torch.randn(s, generator=g) * scale for s in shapes]


def params_with(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_norm_clip_matches_clip_grad_norm(norm_type: float, scale: float) -> None:
    grads = make_grads(0, scale)
    ours, theirs = params_with(grads), params_with(grads)
    core = GuardCore(clip=NormClip(1.0, norm_type), norm_type=norm_type, log_every_n_steps=1)
    report = core.step(torch.optim.SGD(ours, lr=0.1))
    ref_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    assert report.metrics["gradguard/total_norm"] == pytest.approx(ref_total.item(), rel=1e-6)
    clipped_ref = torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type).item()
    assert report.metrics["gradguard/total_norm_clipped"] == pytest.approx(clipped_ref, rel=1e-5)
    coef = min(1.0, 1.0 / (ref_total.item() + 1e-6))
    assert report.metrics["gradguard/clip_coef"] == pytest.approx(coef, rel=1e-6)


def test_norm_clip_keeps_direction() -> None:
    grads = make_grads(3, 50.0)
    flat_before = torch.cat([g.flatten() for g in grads])
    total = F.total_norm(grads)
    F.clip_grads_by_norm_(grads, 0.5, total)
    flat_after = torch.cat([g.flatten() for g in grads])
    cos = torch.nn.functional.cosine_similarity(flat_before, flat_after, dim=0).item()
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert flat_after.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_value_clip_matches_clip_grad_value() -> None:
    grads = make_grads(1, 3.0)
    ours, theirs = params_with(grads), params_with(grads)
    core = GuardCore(clip=ValueClip(0.7), log_every_n_steps=1)
    report = core.step(torch.optim.SGD(ours, lr=0.1))
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in theirs]).item()
    before = torch.nn.utils.get_total_norm(grads).item()
    assert report.metrics["gradguard/total_norm_clipped"] == pytest.approx(clipped, rel=1e-6)
    assert report.metrics["gradguard/clip_coef"] == pytest.approx(clipped / before, rel=1e-6)


@pytest.mark.parametrize("clip", [NormClip(1.0), ValueClip(0.1)])
def test_clippers_never_make_nonfinite_finite(clip: NormClip | ValueClip) -> None:
    grads = make_grads(2, 5.0)
    grads[2][0, 0] = math.inf
    grads[3][0, 0, 0] = math.nan
    ps = params_with(grads)
    core = GuardCore(clip=clip, on_nonfinite="warn")
    if clip.deferred:  # ValueClip needs to know on the host that the step is finite
        with pytest.warns(UserWarning, match="non-finite"):
            report = core.step(torch.optim.SGD(ps, lr=0.1))
        assert report.nonfinite and not report.skipped
    else:  # "warn" on a non-logging step: no host sync; the flags are read at the next sync
        report = core.step(torch.optim.SGD(ps, lr=0.1))
        assert report.deferred and not report.skipped and core.nonfinite_steps == 0
        with pytest.warns(UserWarning, match="non-finite"):
            core.flush()
        assert core.nonfinite_steps == 1 and core.events[0].action == "warned"
        assert core.events[0].layers == ("unregistered.g0.p2", "unregistered.g0.p3")
    for p, g in zip(ps, grads, strict=True):  # left exactly as they were
        assert torch.equal(torch.nan_to_num(p.grad, 7.0, 8.0, 9.0), torch.nan_to_num(g, 7.0, 8.0, 9.0))


@pytest.mark.parametrize(
    ("factory", "arg"),
    [
        (lambda: NormClip(0.0), "max_norm"),
        (lambda: NormClip(-1.0), "max_norm"),
        (lambda: NormClip(math.nan), "max_norm"),
        (lambda: NormClip(1.0, norm_type=0), "norm_type"),
        (lambda: ValueClip(-2), "max_value"),
        (lambda: ValueClip(math.inf), "max_value"),
    ],
)
def test_bad_clip_arguments(factory: object, arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`"):
        factory()  # type: ignore[operator]


def test_wrong_types() -> None:
    with pytest.raises(TypeError, match="`max_norm`"):
        NormClip("1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`max_value`"):
        ValueClip(True)  # type: ignore[arg-type]
