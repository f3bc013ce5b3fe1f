"""Unusual but legal models and optimizers, and hostile constructor arguments (Hypothesis)."""

from __future__ import annotations

import gc
import math
import tracemalloc
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    AGC,
    AutoClip,
    GradGuard,
    GradGuardWarning,
    GuardCore,
    LayerNormClip,
    NormClip,
    ValueClip,
    ZClip,
)
from tests.helpers import FaultNet, poison, trainer


class NoParams(pl.LightningModule):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return torch.zeros((), requires_grad=True)

    def configure_optimizers(self) -> None:
        return None

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)


def test_a_model_without_trainable_parameters_gets_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([GradGuard()], steps=2).fit(NoParams())
    ours = [w for w in caught if "no trainable parameters" in str(w.message)]
    assert len(ours) == 1

    frozen = nn.Linear(2, 2).requires_grad_(False)
    core = GuardCore(frozen)
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    with pytest.warns(GradGuardWarning, match="nothing to measure"):
        core.step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        core.step(opt)  # once only


class NoOptimizer(FaultNet):
    def configure_optimizers(self) -> None:  # type: ignore[override]
        return None


def test_without_an_optimizer_the_guard_says_so_and_claims_no_guarded_step() -> None:
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([guard], steps=12).fit(NoOptimizer({}))
    assert any("configures no optimizer" in str(w.message) for w in caught)
    assert guard.summary() == (
        "GradGuard summary: nothing guarded: none of the 12 steps had a gradient to measure (no optimizer, or every "
        "parameter frozen or unused)."
    )


def test_parameters_outside_the_optimizer_are_ignored_and_groups_work() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    stray = nn.Parameter(torch.ones(2))  # in the optimizer, not in the model
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": [stray], "lr": 1.0}], lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    model[1].weight.grad = torch.full_like(model[1].weight, math.nan)  # not in the optimizer: ignored
    stray.grad = torch.tensor([3.0, 4.0])
    report = GuardCore(model, log_every_n_steps=1).step(opt)
    assert not report.nonfinite
    assert set(report.layer_norms) == {"0", "unregistered.g1.p0"}
    assert report.layer_norms["unregistered.g1.p0"] == pytest.approx(5.0)


def test_sparse_gradients_are_skipped_with_one_warning() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 1)
    model = nn.ModuleDict({"emb": emb, "head": head})
    sparse_opt, dense_opt = torch.optim.SparseAdam(emb.parameters()), torch.optim.Adam(head.parameters())
    core = GuardCore(model, log_every_n_steps=1, track_timesteps=False)
    for step in range(3):
        for o in (sparse_opt, dense_opt):
            o.zero_grad()
        head(emb(torch.tensor([1, 2, 3]))).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            core.step(sparse_opt)
            report = core.step(dense_opt)
        assert len([w for w in caught if "sparse" in str(w.message)]) == (1 if step == 0 else 0)
        assert set(report.layer_norms) == {"head"}
        sparse_opt.step()
        dense_opt.step()


def test_complex_and_zero_dim_parameters() -> None:
    w = nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    s = nn.Parameter(torch.tensor(2.0))
    loss = (w * s).abs().sum()
    loss.backward()
    core = GuardCore(log_every_n_steps=1, clip=NormClip(0.1))
    ref = torch.linalg.vector_norm(torch.cat([w.grad.abs().flatten(), s.grad.reshape(1)])).item()
    report = core.step(torch.optim.SGD([w, s], lr=0.1))
    assert report.metrics["gradguard/total_norm"] == pytest.approx(ref, rel=1e-6)
    assert report.metrics["gradguard/total_norm_clipped"] == pytest.approx(0.1, rel=1e-4)


class GradsBefore(pl.Callback):
    """Listed before the guard: each step's reference norms from ``.grad`` (in float64), before any clip."""

    def __init__(self) -> None:
        self.layers: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.layers.append({
            name: float(torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in layer.parameters()])))
            for name, layer in (("l0", pl_module.l0), ("l1", pl_module.l1), ("l2", pl_module.l2))
        })  # fmt: skip


def test_bf16_true_precision() -> None:
    reference = GradsBefore()
    guard = GradGuard(clip=NormClip(0.05), log_every_n_steps=1)
    model = FaultNet()
    reports = []
    record = type("Record", (pl.Callback,), {
        "on_before_optimizer_step": lambda self, t, m, o: reports.append(guard.last_report)})()  # fmt: skip
    trainer([reference, guard, record], steps=3, precision="bf16-true").fit(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert guard.skipped_steps == 0 and len(reports) == len(reference.layers) == 3
    for report, ref in zip(reports, reference.layers, strict=True):
        # bf16 gradients, norms accumulated in float32: equal to the float64 reference of the same
        # bf16 values to float32's precision
        assert report.layer_norms == pytest.approx(ref, rel=1e-5)
        total = math.sqrt(sum(v * v for v in ref.values()))
        assert report.metrics["gradguard/total_norm"] == pytest.approx(total, rel=1e-5)
        # the clip rescaled the bf16 gradients to 0.05 (to bf16's precision: 8 bits of mantissa)
        assert total > 0.05 and report.metrics["gradguard/total_norm_clipped"] == pytest.approx(0.05, rel=1e-2)


class Branchy(nn.Module):
    """`late` runs only when asked: it is missing from the forward order recorded on the first pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.late = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)

    def forward(self, x: Tensor, branch: bool = False, poison_at: str | None = None) -> Tensor:
        h = self.a(x)
        if poison_at == "a":
            h = poison(h, math.nan)
        if branch:
            h = self.late(h)
            if poison_at == "late":
                h = poison(h, math.nan)
        return self.b(h)  # type: ignore[no-any-return]


def test_changing_graphs_say_when_the_origin_is_uncertain() -> None:
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core = GuardCore(model, track_timesteps=False)
    x = torch.randn(4, 3)
    model(x).sum().backward()  # first pass: order a, b
    core.step(opt)
    opt.zero_grad()
    model(x, branch=True).sum().backward()  # the branch runs: guarded, measured
    assert not core.step(opt).nonfinite
    for where, certain in (("a", True), ("late", False)):  # a ran in the first pass; late did not
        opt.zero_grad()
        model(x, branch=True, poison_at=where).sum().backward()
        with pytest.warns(GradGuardWarning):
            report = core.step(opt)
        assert report.event is not None
        assert report.event.extra["origin_certain"] is certain
        assert ("Origin uncertain" in report.event.message) is not certain
        assert report.event.layers == (("a",) if where == "a" else ("a", "late"))
        assert report.event.origin == where


def test_long_sequences_stay_within_bounded_memory() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(2, 4, batch_first=True)
    core = GuardCore(rnn, log_every_n_steps=1, timestep_history=2)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.0)
    x = torch.randn(2, 10_000, 2)
    tracemalloc.start()
    python_side, tensors = [], []
    for step in range(5):
        core.begin_step(step)
        opt.zero_grad()
        out, _ = rnn(x)
        out[:, -1].sum().backward()
        core.step(opt)
        del out
        python_side.append(tracemalloc.get_traced_memory()[0])
        tensors.append(_live_tensor_bytes() if step >= 2 else 0)
    tracemalloc.stop()
    assert core.timestep_norms["rnn"].shape == (10_000,)
    assert len(core.timestep_heat["rnn"]) == 2  # bounded history
    # tracemalloc sees Python's allocations only, not torch's allocator: the tensors alive are counted
    # from their storages (a profile is 40 kB). Once the history is full (step 2), both stay flat.
    assert python_side[-1] - python_side[2] < 2_000_000
    assert tensors[2] == tensors[3] == tensors[4], tensors


def _live_tensor_bytes() -> int:
    """The bytes of every tensor storage reachable from Python objects (each storage once)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ------------------------------------------------------------ hostile arguments
BAD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)

CONSTRUCTORS: dict[str, tuple[Any, dict[str, Any]]] = {
    "NormClip.max_norm": (lambda v: NormClip(max_norm=v), {}),
    "ValueClip.max_value": (lambda v: ValueClip(max_value=v), {}),
    "LayerNormClip.max_norm": (lambda v: LayerNormClip(max_norm=v), {}),
    "AGC.clip_factor": (lambda v: AGC(clip_factor=v), {}),
    "AGC.eps": (lambda v: AGC(eps=v), {}),
    "AGC.exclude": (lambda v: AGC(exclude=v), {}),
    "AutoClip.percentile": (lambda v: AutoClip(percentile=v), {}),
    "AutoClip.history": (lambda v: AutoClip(history=v), {}),
    "ZClip.alpha": (lambda v: ZClip(alpha=v), {}),
    "ZClip.z_threshold": (lambda v: ZClip(z_threshold=v), {}),
    "ZClip.warmup_steps": (lambda v: ZClip(warmup_steps=v), {}),
    "ZClip.max_norm": (lambda v: ZClip(max_norm=v), {}),
    "GradGuard.norm_type": (lambda v: GradGuard(norm_type=v), {}),
    "GradGuard.on_nonfinite": (lambda v: GradGuard(on_nonfinite=v), {}),
    "GradGuard.max_consecutive_skips": (lambda v: GradGuard(max_consecutive_skips=v), {}),
    "GradGuard.log_every_n_steps": (lambda v: GradGuard(log_every_n_steps=v), {}),
    "GradGuard.group_by": (lambda v: GradGuard(group_by=v), {}),
    "GradGuard.track_timesteps": (lambda v: GradGuard(track_timesteps=v), {}),
    "GradGuard.timestep_vanish_ratio": (lambda v: GradGuard(timestep_vanish_ratio=v), {}),
    "GradGuard.explode_threshold": (lambda v: GradGuard(explode_threshold=v), {}),
    "GradGuard.spike_zscore": (lambda v: GradGuard(spike_zscore=v), {}),
    "GradGuard.spike_warmup": (lambda v: GradGuard(spike_warmup=v), {}),
    "GradGuard.vanish_threshold": (lambda v: GradGuard(vanish_threshold=v), {}),
    "GradGuard.vanish_ratio": (lambda v: GradGuard(vanish_ratio=v), {}),
    "GradGuard.vanish_patience": (lambda v: GradGuard(vanish_patience=v), {}),
    "GradGuard.min_loss_scale": (lambda v: GradGuard(min_loss_scale=v), {}),
    "GradGuard.alert_every": (lambda v: GradGuard(alert_every=v), {}),
    "GradGuard.alert_handlers": (lambda v: GradGuard(alert_handlers=v), {}),
    "GradGuard.dump_dir": (lambda v: GradGuard(dump_dir=v), {}),
    "GradGuard.max_dumps": (lambda v: GradGuard(max_dumps=v), {}),
    "GradGuard.log_histograms": (lambda v: GradGuard(log_histograms=v), {}),
    "GradGuard.images": (lambda v: GradGuard(images=v), {}),
    "GradGuard.images_in_background": (lambda v: GradGuard(images_in_background=v), {}),
    "GradGuard.clip": (lambda v: GradGuard(clip=v), {}),
}


@pytest.mark.parametrize("target", sorted(CONSTRUCTORS))
@settings(max_examples=40, deadline=None)
@given(value=BAD_VALUES)
def test_constructor_arguments_fail_early_and_name_the_argument(target: str, value: Any) -> None:
    """Any value either constructs an object that works on a step, or raises ValueError/TypeError naming
    the argument; never a later crash inside a hook."""
    build, _ = CONSTRUCTORS[target]
    argument = target.split(".")[1]
    try:
        obj = build(value)
    except (ValueError, TypeError) as exc:
        assert f"`{argument}`" in str(exc), str(exc)
        return
    # accepted: it must then work on a real step
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, -2.0, 2.0])
    opt = torch.optim.SGD([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(obj, GradGuard):
            obj.core.step(opt, log=True)
        else:
            GuardCore(clip=obj, log_every_n_steps=1).step(opt)
