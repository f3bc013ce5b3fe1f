"""Per-tensor, per-layer and total norms against independent torch references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard import GuardCore
from lightning_gradguard import functional as F
from lightning_gradguard.primitives.layout import LayerMap


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.rnn = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1]) * self.scale


def backward(net: Net, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x = torch.randint(0, 10, (4, 7))
    net(x).pow(2).sum().backward()


def reference_layer_norms(net: Net, norm_type: float) -> dict[str, float]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in net.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("rnn."):
            local = name.split(".", 1)[1]
            suffix = local.split("_", 2)[2]  # e.g. l1_reverse
            layer = f"rnn.{suffix}"
        elif "." in name:
            layer = name.rsplit(".", 1)[0]
        else:
            layer = name
        groups.setdefault(layer, []).append(p.grad.flatten())
    return {k: torch.linalg.vector_norm(torch.cat(v), norm_type).item() for k, v in groups.items()}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_layer_and_total_norms_match_torch(norm_type: float) -> None:
    torch.manual_seed(0)
    net = Net()
    core = GuardCore(net, norm_type=norm_type, log_every_n_steps=1)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    backward(net)
    expected = reference_layer_norms(net, norm_type)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    total_ref = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), norm_type).item()
    assert total_ref == pytest.approx(torch.nn.utils.get_total_norm(grads, norm_type).item(), rel=1e-6)

    report = core.step(opt)
    assert set(report.layer_norms) == {
        "embed", "rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse", "head", "scale"
    }
    for name, value in expected.items():
        assert report.layer_norms[name] == pytest.approx(value, rel=1e-5), name
    assert report.metrics["gradguard/total_norm"] == pytest.approx(total_ref, rel=1e-5)
    assert report.total_norm.item() == pytest.approx(total_ref, rel=1e-5)


def test_group_by_parameter_uses_full_names() -> None:
    net = Net()
    core = GuardCore(net, group_by="parameter", log_every_n_steps=1)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    backward(net)
    report = core.step(opt)
    named = {n: p.grad.norm().item() for n, p in net.named_parameters() if p.grad is not None}
    assert set(report.layer_norms) == set(named)
    for name, value in named.items():
        assert report.layer_norms[name] == pytest.approx(value, rel=1e-5)


def test_parameters_without_grad_are_left_out() -> None:
    net = Net()
    core = GuardCore(net, log_every_n_steps=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # includes the frozen layer
    backward(net)
    net.head.weight.grad = None
    report = core.step(opt)
    assert "frozen" not in report.layer_norms
    assert report.layer_norms["head"] == pytest.approx(net.head.bias.grad.norm().item(), rel=1e-6)


def test_no_logging_step_no_layer_work() -> None:
    net = Net()
    core = GuardCore(net, log_every_n_steps=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    logged = []
    for _ in range(6):
        opt.zero_grad()
        backward(net)
        logged.append(bool(core.step(opt).layer_norms))
    assert logged == [False, False, True, False, False, True]


def test_functional_group_norms_matches_loop() -> None:
    torch.manual_seed(1)
    norms = torch.rand(10)
    index = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 3])
    for p in (1.0, 2.0, 3.0, math.inf):
        got = F.group_norms(norms, index, 4, p)
        for g in range(4):
            ref = torch.linalg.vector_norm(norms[index == g], p)
            assert got[g].item() == pytest.approx(ref.item(), rel=1e-6)


def test_mixed_dtypes_and_fp16_do_not_overflow() -> None:
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # its square overflows fp16
    small = torch.tensor([3.0, 4.0])
    got = F.grad_norms([big, small]).tolist()
    assert got[0] == pytest.approx(60000.0 * math.sqrt(1000), rel=1e-3)
    assert got[1] == pytest.approx(5.0)


def test_nonfinite_norms_propagate() -> None:
    got = F.grad_norms([torch.tensor([1.0, math.nan]), torch.tensor([math.inf])], 2.0)
    assert math.isnan(got[0].item()) and math.isinf(got[1].item())
    got_inf = F.grad_norms([torch.tensor([1.0, math.nan])], math.inf)
    assert math.isnan(got_inf[0].item())
    assert math.isnan(F.group_norms(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]), 1, math.inf).item())


def test_layer_names_tied_root_and_unregistered() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.embed.weight
            self.gain = nn.Parameter(torch.ones(()))

    model = Tied()
    extra = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": list(model.parameters())}, {"params": [extra]}], lr=0.1)
    lm = LayerMap()
    lm.watch(model)
    layout = lm.layout(opt)
    assert layout.layer_names == ["gain", "embed", "unregistered.g1.p0"]  # tied weight counted once, as "embed"
    assert len(layout.params) == 3
