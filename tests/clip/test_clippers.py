"""LayerNormClip, AGC, AutoClip and ZClip against references written here from the papers' formulas."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradguard import AGC, AutoClip, ClipContext, GuardCore, LayerNormClip, NormClip, ValueClip, ZClip
from lightning_gradguard import functional as F

SHAPES = [(), (5,), (3, 4), (2, 3, 4), (2, 2, 2, 3)]


def grads_of(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


# ---------------------------------------------------------------- LayerNormClip
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_layer_norm_clip_matches_clip_grad_norm_per_layer(norm_type: float) -> None:
    grads = grads_of(0, 3.0)
    layer_of = [0, 0, 1, 2, 2]
    ours = [g.clone() for g in grads]
    ctx = ClipContext.of(ours, norm_type, layer_of=layer_of, layer_names=["a", "b", "c"])
    out = LayerNormClip(1.0, norm_type).clip_(ctx)
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clipped = 0
    for layer in range(3):
        members = [params[i] for i in range(5) if layer_of[i] == layer]
        clipped += int(torch.nn.utils.clip_grad_norm_(members, 1.0, norm_type) > 1.0)
    for a, p in zip(ours, params, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=0)
    assert int(out.clipped_units) == clipped  # type: ignore[arg-type]


def test_layer_norm_clip_in_guard_uses_model_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(32, 4) * 10
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    guard = GuardCore(model, clip=LayerNormClip(0.5), log_every_n_steps=1)
    report = guard.step(torch.optim.SGD(model.parameters(), lr=0.1))
    for layer in (twin[0], twin[2]):
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert report.metrics["gradguard/clipped_units"] == 2.0
    assert report.metrics["gradguard/clip_threshold"] == 0.5
    assert report.metrics["gradguard/clipped_fraction"] == 1.0


# -------------------------------------------------------------------------- AGC
def agc_reference(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float, eps: float) -> list[torch.Tensor]:
    """Brock et al. 2021, unit-wise, written as plainly as possible (row by row)."""
    out = []
    for w, g in zip(params, grads, strict=True):
        g = g.clone()
        if w.ndim <= 1:
            wn = max(float(w.norm()), eps)
            gn = float(g.norm())
            if gn / wn > lam:
                g = g * (lam * wn / gn)
        else:
            for i in range(w.shape[0]):
                wn = max(float(w[i].norm()), eps)
                gn = float(g[i].norm())
                if gn / wn > lam:
                    g[i] = g[i] * (lam * wn / gn)
        out.append(g)
    return out


@pytest.mark.parametrize("lam", [0.01, 0.5])
def test_agc_matches_the_paper(lam: float) -> None:
    torch.manual_seed(1)
    weights = [torch.randn(s) for s in SHAPES]
    weights[3][1] = 0.0  # a zero unit: the eps floor
    grads = grads_of(2, 0.5)
    params = [nn.Parameter(w) for w in weights]
    ours = [g.clone() for g in grads]
    out = AGC(clip_factor=lam).clip_(ClipContext.of(ours, params=params))
    ref = agc_reference(weights, grads, lam, 1e-3)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    units = sum(1 if w.ndim <= 1 else w.shape[0] for w in weights)
    changed = sum(
        int(not torch.equal(a, g)) if w.ndim <= 1 else int((a != g).flatten(1).any(1).sum())
        for a, g, w in zip(ours, grads, weights, strict=True)
    )
    assert int(out.clipped_units) == changed <= units  # type: ignore[arg-type]
    assert out.threshold is not None and out.threshold.item() == pytest.approx(lam)


def test_agc_exclude_patterns_and_1d_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    model(torch.randn(8, 4)).pow(2).sum().mul(1e3).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    guard = GuardCore(model, clip=AGC(0.01, exclude=["head*"]), log_every_n_steps=1)
    report = guard.step(torch.optim.SGD(model.parameters(), lr=0.1))
    named = dict(model.named_parameters())
    assert torch.equal(named["head.weight"].grad, before["head.weight"])  # excluded by glob
    assert torch.equal(named["head.bias"].grad, before["head.bias"])
    ref = agc_reference(
        [named["body.weight"].detach(), named["body.bias"].detach()],
        [before["body.weight"], before["body.bias"]],
        0.01,
        1e-3,
    )
    torch.testing.assert_close(named["body.weight"].grad, ref[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(named["body.bias"].grad, ref[1], rtol=1e-5, atol=1e-8)  # 1-D: one unit
    assert report.metrics["gradguard/clipped_units"] == 4 + 1  # every row of body.weight, and body.bias

    # exact names work too, and layer names exclude all of a layer's parameters
    for exclude in (["head.weight", "head.bias"], ["head"]):
        clip = AGC(0.01, exclude=exclude)
        ctx_model = GuardCore(model, clip=clip, log_every_n_steps=1)
        for n, p in model.named_parameters():
            p.grad = before[n].clone()
        ctx_model.step(torch.optim.SGD(model.parameters(), lr=0.1))
        assert torch.equal(named["head.weight"].grad, before["head.weight"])


# --------------------------------------------------------------------- AutoClip
def test_autoclip_threshold_is_numpy_percentile_of_the_window() -> None:
    clip = AutoClip(percentile=25.0, history=7)
    rng = np.random.default_rng(0)
    seen: list[float] = []
    for step in range(20):
        norm = float(rng.lognormal())
        if step in (5, 11):  # non-finite steps never enter the history
            g = [torch.tensor([math.nan, 1.0])]
            out = clip.clip_(ClipContext.of(g))
            assert math.isnan(g[0][0].item()) and g[0][1].item() == 1.0  # untouched
            assert out.coef.item() == 1.0
            continue
        g = [torch.tensor([norm])]
        out = clip.clip_(ClipContext.of(g))
        seen.append(norm)
        window = np.array(seen[-7:], dtype=np.float32)
        expected = np.percentile(window, 25.0)
        assert out.threshold is not None
        assert out.threshold.item() == pytest.approx(float(expected), rel=1e-6)
        assert g[0].item() == pytest.approx(min(norm, norm * float(expected) / (norm + 1e-6)), rel=1e-6)
        np.testing.assert_allclose(clip.window.numpy(), window, rtol=0)
    assert F.percentile_threshold(torch.tensor(seen[-7:]), 25.0).item() == pytest.approx(
        float(np.percentile(np.array(seen[-7:], dtype=np.float32), 25.0)), rel=1e-6
    )


# ------------------------------------------------------------------------ ZClip
class ZClipReference:
    """The rules of ZClip as the issue states them (the authors' zclip.py, zscore/adaptive_scaling),
    plus the NaN rule: non-finite norms are ignored entirely."""

    def __init__(self, alpha: float, z: float, warmup: int, max_norm: float | None) -> None:
        self.alpha, self.z, self.warmup, self.max_norm = alpha, z, warmup, max_norm
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def step(self, g: float) -> float:
        """Returns the clip coefficient applied to a step of total norm g."""
        if not math.isfinite(g):
            return 1.0
        if self.mean is None or self.var is None:
            self.buffer.append(g)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            if self.max_norm is not None:
                return min(1.0, self.max_norm / (g + 1e-6))
            return 1.0
        std = self.var**0.5
        zscore = (g - self.mean) / (std + 1e-6)
        g_hat = self.mean + (self.z**2 / zscore) * std if zscore > self.z else g
        applied = min(g_hat, self.max_norm) if self.max_norm is not None else g_hat
        coef = applied / (g + 1e-6) if g > applied else 1.0
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g_hat
        self.var = self.alpha * self.var + (1 - self.alpha) * (g_hat - self.mean) ** 2
        return coef


@pytest.mark.parametrize("max_norm", [None, 1.1])
def test_zclip_follows_the_reference_rules(max_norm: float | None) -> None:
    rng = np.random.default_rng(3)
    norms = [1.0 + 0.1 * float(rng.standard_normal()) for _ in range(40)]
    norms[30] = 20.0  # a spike after warm-up
    norms[33] = math.nan  # a NaN step
    norms[34] = math.inf
    clip, ref = ZClip(alpha=0.9, z_threshold=2.5, warmup_steps=10, max_norm=max_norm), ZClipReference(
        0.9, 2.5, 10, max_norm
    )
    for i, n in enumerate(norms):
        g = [torch.tensor([n], dtype=torch.float32)]
        out = clip.clip_(ClipContext.of(g))
        expected = ref.step(float(torch.tensor(n, dtype=torch.float32)) if math.isfinite(n) else n)
        assert out.coef.item() == pytest.approx(expected, rel=1e-6, abs=1e-12), i
        if not math.isfinite(n):
            assert not math.isfinite(g[0].item())  # never made finite
        if ref.mean is not None:
            assert clip.mean == pytest.approx(ref.mean, rel=1e-9)
            assert clip.var == pytest.approx(ref.var, rel=1e-9)
    assert ref.mean is not None


def test_zclip_spike_is_clipped_exactly_to_the_reciprocal_rule_and_nan_leaves_stats() -> None:
    clip = ZClip(alpha=0.97, z_threshold=2.5, warmup_steps=5)
    for n in (1.0, 1.1, 0.9, 1.0, 1.0):
        clip.clip_(ClipContext.of([torch.tensor([n])]))
    mu, var = clip.mean, clip.var
    assert mu == pytest.approx(1.0) and var == pytest.approx(0.004)
    nan = [torch.tensor([math.nan])]
    clip.clip_(ClipContext.of(nan))
    assert (clip.mean, clip.var) == (mu, var)  # bit-for-bit unchanged
    g = [torch.tensor([3.0, 4.0])]  # total 5: a spike
    out = clip.clip_(ClipContext.of(g))
    sigma = math.sqrt(var)
    z = (5.0 - mu) / (sigma + 1e-6)
    target = mu + (2.5**2 / z) * sigma
    assert float(g[0].norm()) == pytest.approx(target * 5.0 / (5.0 + 1e-6), rel=1e-6)
    assert bool(out.clipped)
    cos = torch.nn.functional.cosine_similarity(g[0], torch.tensor([3.0, 4.0]), dim=0).item()
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert F.zclip_target(5.0, mu, sigma) == pytest.approx(target, rel=1e-9)


# ------------------------------------------------------------ shared properties
def same_state(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return a == b


CLIPPERS = [
    lambda: NormClip(0.5),
    lambda: LayerNormClip(0.5),
    lambda: AGC(0.01),
    lambda: AutoClip(10.0),
    lambda: ZClip(warmup_steps=3),
]


@pytest.mark.parametrize("make", [NormClip, AutoClip, ZClip], ids=["norm", "autoclip", "zclip"])
def test_norm_based_clipping_keeps_direction(make: type) -> None:
    clip = make(0.5) if make is NormClip else make() if make is AutoClip else ZClip(warmup_steps=3)
    for scale in (1.0, 1.0, 1.0, 1.0, 50.0):
        grads = grads_of(5, scale)
        before = flat(grads)
        out = clip.clip_(ClipContext.of(grads))
    after = flat(grads)
    assert bool(out.clipped)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=0).item()
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_value_clipping_changes_direction() -> None:
    grads = grads_of(5, 3.0)
    before = flat(grads)
    ValueClip(0.5).clip_(ClipContext.of(grads))
    cos = torch.nn.functional.cosine_similarity(before, flat(grads), dim=0).item()
    assert cos < 0.99


@pytest.mark.parametrize("make", CLIPPERS, ids=["norm", "layer", "agc", "autoclip", "zclip"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clipper_leaves_nonfinite_gradients_alone(make, bad: float) -> None:  # type: ignore[no-untyped-def]
    clip = make()
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    for _ in range(4):  # some healthy history first
        grads = grads_of(7, 10.0)
        clip.clip_(ClipContext.of(grads, params=params))
    state = copy.deepcopy(clip.state_dict())
    grads = grads_of(8, 10.0)
    grads[2][1, 1] = bad
    before = [g.clone() for g in grads]
    out = clip.clip_(ClipContext.of(grads, params=params))
    for a, b in zip(grads, before, strict=True):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))  # exactly as handed in
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert out.coef.item() == 1.0
    assert same_state(clip.state_dict(), state)  # a non-finite norm never enters the state


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: LayerNormClip(-1.0), "max_norm"),
        (lambda: LayerNormClip(1.0, norm_type=0), "norm_type"),
        (lambda: AGC(clip_factor=-0.1), "clip_factor"),
        (lambda: AGC(eps=0), "eps"),
        (lambda: AutoClip(percentile=0.0), "percentile"),
        (lambda: AutoClip(percentile=100.5), "percentile"),
        (lambda: AutoClip(history=0), "history"),
        (lambda: ZClip(alpha=1.0), "alpha"),
        (lambda: ZClip(alpha=0.0), "alpha"),
        (lambda: ZClip(z_threshold=-1), "z_threshold"),
        (lambda: ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: ZClip(max_norm=0.0), "max_norm"),
    ],
)
def test_bad_arguments_name_the_argument(build, argument: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=f"`{argument}`"):
        build()


def test_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="`exclude`"):
        AGC(exclude="head")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`history`"):
        AutoClip(history=10.5)  # type: ignore[arg-type]


def test_percentile_100_is_the_max() -> None:
    clip = AutoClip(percentile=100.0)
    for n in (1.0, 5.0, 2.0):
        out = clip.clip_(ClipContext.of([torch.tensor([n])]))
    assert out.threshold is not None and out.threshold.item() == 5.0 and out.coef.item() == 1.0


@pytest.mark.parametrize("make", CLIPPERS, ids=["norm", "layer", "agc", "autoclip", "zclip"])
def test_state_round_trips_and_pickles(make) -> None:  # type: ignore[no-untyped-def]
    clip = make()
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    for seed in range(6):
        clip.clip_(ClipContext.of(grads_of(seed, 1.0 + seed), params=params))
    twin = pickle.loads(pickle.dumps(clip))
    fresh = make()
    fresh.load_state_dict(clip.state_dict())
    for seed in range(6, 12):
        outs = []
        for c in (clip, twin, fresh):
            grads = grads_of(seed, 2.0 ** (seed - 6))
            outs.append((c.clip_(ClipContext.of(grads, params=params)).coef.item(), flat(grads)))
        assert outs[0][0] == outs[1][0] == outs[2][0]
        assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][1], outs[2][1])


def test_autoclip_refuses_a_checkpoint_of_another_window() -> None:
    with pytest.raises(ValueError, match="history"):
        AutoClip(history=5).load_state_dict(AutoClip(history=6).state_dict())


def test_functional_forms() -> None:
    g = [torch.tensor([3.0, 4.0]), torch.tensor([0.1])]
    assert int(F.clip_layers_by_norm_(g, [0, 1], 1.0)) == 1
    torch.testing.assert_close(g[0], torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    w = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
    assert int(F.adaptive_clip_([w], clip_factor=0.1)) == 1
    torch.testing.assert_close(w.grad, torch.tensor([[0.1, 0.0], [0.0, 0.001]]))
