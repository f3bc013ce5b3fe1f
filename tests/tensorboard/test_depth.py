"""At the depth of real models: a 300-layer run's verdict summarises, zero is a value, the heatmap
fits one screen (grouped rows that expand, binned steps whose hover stays exact)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardWarning
from lightning_gradguard.cli import main as report_main
from tests.browser import browser_or_skip
from tests.helpers import get_json, tensorboard_server, trainer
from tests.tensorboard.test_tab import _plugin_for

DEPTH = 300
DEAD = "layers.150"  # its output is multiplied by 0: an exactly-zero gradient


class DeepMLP(pl.LightningModule):
    """``nn.Linear(8, 8)`` + tanh, 300 deep, SGD: the gradients vanish, truly, in most layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(DEPTH))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) * (0.0 if f"layers.{i}" == DEAD else 1.0)
            if f"layers.{i}" == DEAD:
                x = x + 0.5
        return x.sum(dim=1, keepdim=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)), 8)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GradGuard]:
    root = tmp_path_factory.mktemp("deep")
    guard = GradGuard(log_every_n_steps=1, images=False, track_timesteps=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer([guard], steps=6, logger=TensorBoardLogger(root, name="deep", version="")).fit(DeepMLP())
    return root, guard


def _cli(logdir: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report_main(["report", str(logdir), "--json"])
    (run,) = json.loads(out.getvalue())
    return run  # type: ignore[no-any-return]


def test_a_300_layer_verdict_summarises_in_forward_order_and_the_json_keeps_every_layer(
    deep: tuple[Path, GradGuard],
) -> None:
    root, guard = deep
    forward = [f"layers.{i}" for i in range(DEPTH)]
    vanishing = sorted({n for e in guard.events if e.kind == "vanishing" for n in e.layers}, key=forward.index)
    dead = sorted({n for e in guard.events if e.kind == "dead" for n in e.layers}, key=forward.index)
    assert len(vanishing) + len(dead) > 200  # truly: most layers' gradients vanish, many to exactly zero
    rep = _cli(root)
    assert len(rep["verdict"]) < 300, rep["verdict"]
    for kind, named in (("vanishing gradients in", vanishing), ("layers with exactly zero gradients:", dead)):
        m = re.search(kind + r" (\d+) of 300 layers: layers\.(\d+) … layers\.(\d+)", rep["verdict"])
        assert m is not None, rep["verdict"]
        assert int(m.group(1)) == len(named) and (m.group(2), m.group(3)) == (named[0][7:], named[-1][7:])
    assert rep["layer_order"] == forward
    findings = {f["kind"]: f for f in rep["findings"]}
    assert findings["vanishing"]["layers"] == vanishing and findings["dead"]["layers"] == dead  # in full
    assert len(rep["layers"]) == DEPTH
    assert sum("vanishing" in row["flags"] for row in rep["layers"].values()) == len(vanishing)
    from tensorboard import context

    assert _plugin_for(root).report(context.RequestContext(), "", "deep")["verdict"] == rep["verdict"]


def test_zero_is_a_value_and_the_rows_are_grouped_to_fit(deep: tuple[Path, GradGuard]) -> None:
    root, _ = deep
    from tensorboard import context

    route = _plugin_for(root).layers(context.RequestContext(), "", "deep")
    row = route["layers"].index(DEAD)
    assert route["norms"][row] == [0.0] * 6  # a value, not missing data (None)
    groups = route["groups"]
    assert 2 <= len(groups) <= 48 and sum(len(g["members"]) for g in groups) == DEPTH
    (home,) = [g for g in groups if row in g["members"]]
    assert home["norms"] == [0.0] * 6  # the group shows its worst value: the zero
    # members are consecutive in forward order
    assert [i for g in groups for i in g["members"]] == list(range(DEPTH))


def test_steps_are_binned_to_the_screen_with_exact_hover_values(tmp_path: Path) -> None:
    from tensorboard import context
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard.tensorboard.heatmap import bin_columns

    values = [1.0 + (s % 7) / 10 for s in range(2000)]
    cols = bin_columns(list(range(2000)), [values, [None] * 1000 + [0.0] * 1000])
    assert len(cols["steps"]) == 286 and cols["bins"][0] == [0, 6] and cols["bins"][-1] == [1995, 1999]
    for j, (first, last) in enumerate(cols["bins"]):
        cell = values[first : last + 1]
        assert (cols["lo"][0][j], cols["mid"][0][j], cols["hi"][0][j]) == (
            min(cell), statistics.median(cell), max(cell))  # fmt: skip
        assert cols["norms"][0][j] == min(cell)  # the worst: the smallest norm
    assert cols["norms"][1][:2] == [None, None] and cols["norms"][1][-1] == 0.0  # missing stays missing, 0 is 0

    writer = SummaryWriter(str(tmp_path / "long"))  # and through TensorBoard's data provider, as the tab reads
    for s in range(700):
        writer.add_scalar("gradguard/layer/fc", values[s], s)
        writer.add_scalar("gradguard/total_norm", values[s], s)
    writer.close()
    route = _plugin_for(tmp_path).layers(context.RequestContext(), "", "long")
    assert len(route["steps"]) <= 300 and route["bins"][0][0] == 0 and route["bins"][-1][1] == 699
    assert all(lo <= v <= hi for lo, v, hi in zip(route["lo"][0], route["norms"][0], route["hi"][0], strict=True))


@pytest.fixture(scope="module")
def deep_server(deep: tuple[Path, GradGuard]) -> Iterator[str]:
    root, _ = deep

    def ready(base: str) -> bool:
        return bool(get_json(f"{base}/data/plugin/gradguard/runs") == ["deep"])

    with tensorboard_server(root, ready) as base:
        yield base


def _dom(server: str, tmp_path: Path, query: str = "") -> str:
    url = f"{server}/data/plugin_entry.html?name=gradguard&run=deep{query}"
    proc = subprocess.run(
        [browser_or_skip(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert 'data-gg-ready="1"' in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.browser
def test_the_browser_draws_groups_that_expand_and_a_zero_cell(deep_server: str, tmp_path: Path) -> None:
    dom = _dom(deep_server, tmp_path)
    groups = re.findall(r'<g class="gg-group" data-group="([^"]+)" data-size="(\d+)" data-expanded="0"', dom)
    layer_rows = re.findall(r'<g class="gg-row" data-layer="([^"]+)"', dom)
    assert 2 <= len(groups) <= 48 and layer_rows == []  # a bounded number of rows: one per group
    assert sum(int(size) for _, size in groups) == DEPTH
    sizes = {name: int(size) for name, size in groups}
    (dead_group,) = [name for name in sizes if DEAD in _members(name, sizes[name])]
    opened = _dom(deep_server, tmp_path, f"&expand={dead_group}")
    rows = re.findall(r'<g class="gg-row" data-layer="([^"]+)"', opened)
    assert rows == _members(dead_group, sizes[dead_group])  # its layers, in forward order
    dead_row = opened.split(f'<g class="gg-row" data-layer="{DEAD}"', 1)[1].split("</g>", 1)[0]
    assert dead_row.count('class="gg-cell gg-zero"') == 6  # drawn as zero, not as missing data
    assert "zero gradient (dead)" in opened


def _members(name: str, size: int) -> list[str]:
    """The layers of a group named "layers.a … layers.b"."""
    first, last = (int(part.rsplit(".", 1)[1]) for part in name.split(" … "))
    assert last - first + 1 == size
    return [f"layers.{i}" for i in range(first, last + 1)]


def test_reading_event_files_needs_neither_torch_nor_lightning(deep: tuple[Path, GradGuard]) -> None:
    root, _ = deep
    probe = (
        "import sys, contextlib, io\nfrom lightning_gradguard.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    main(['report', {str(root)!r}])\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
