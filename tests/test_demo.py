"""The demo's conclusions (``examples/vanishing_gradients.py``), not its digits.

The digits vary with the machine and the number of threads (float sums in another order); the README's
tables are the scripts' own ``--markdown`` output. What the README concludes from them is checked here,
on the demo's own configuration and seed: the vanilla RNN's gradient vanishes and it stays at chance, the
LSTM carries it and learns, the ``exploding`` RNN's gradient explodes, is clipped, its NaN batches are
skipped and it learns. One thread runs in ``make test`` (about 25 s on 2 busy cores); two threads are
marked slow (``pytest -m slow tests/test_demo.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import clipping_comparison
import vanishing_gradients as demo_script
from vanishing_gradients import CONFIGS, SEQ_LEN

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHANCE = 0.25  # 4 balanced classes; the largest one is 26.8% of the validation set


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["1thread", "2threads"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The three runs of the demo, exactly as ``python examples/vanishing_gradients.py --threads N`` trains them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        logdir = tmp_path_factory.mktemp("demo")
        return {name: demo_script.run(name, logdir) for name in CONFIGS}
    finally:
        torch.set_num_threads(before)


def test_rnn_gradient_vanishes_and_it_stays_at_chance(demo: dict[str, dict[str, Any]]) -> None:
    r = demo["rnn"]
    assert r["decay"] < 1
    assert r["ratio0"] < 1e-4  # at the first logging step
    assert r["ratio"] < 1e-4  # and still at the last one
    assert r["accuracy"] < CHANCE + 0.1
    assert r["skipped"] == r["poisoned"] == 0
    assert r["finite"]


def test_lstm_carries_the_gradient_back_and_learns(demo: dict[str, dict[str, Any]]) -> None:
    r = demo["lstm"]
    assert r["horizon"] == SEQ_LEN
    assert r["ratio0"] > 1e-2
    assert r["accuracy"] >= 0.9
    assert r["skipped"] == r["poisoned"] == 0
    assert r["finite"]


def test_exploding_rnn_gradient_explodes_and_is_clipped(demo: dict[str, dict[str, Any]]) -> None:
    r = demo["exploding"]
    assert r["steps"] == CONFIGS["exploding"]["steps"]
    # At the first logging step its gradient grows going back in time; its norm reaches 100x the threshold (1).
    assert r["decay"] > 1
    assert r["ratio0"] > 100
    assert r["max_norm"] > 100
    assert r["clipped"] >= r["steps"] // 20


def test_exploding_rnn_skips_exactly_its_nan_batches(demo: dict[str, dict[str, Any]]) -> None:
    r = demo["exploding"]
    # Every batch holding a NaN record (counted from the data) is one skipped step, and nothing else is.
    assert r["poisoned"] > 0
    assert r["skipped"] == r["nonfinite_events"] == r["poisoned"]
    assert r["finite"]


def test_exploding_rnn_learns(demo: dict[str, dict[str, Any]]) -> None:
    # Well above chance: it reached at least 99.9% with every seed and thread count tried.
    assert demo["exploding"]["accuracy"] >= 2 * CHANCE


def _section(readme: str, heading: str) -> str:
    return readme.split(heading + "\n", 1)[1].split("\n#", 1)[0]


@pytest.mark.parametrize(
    ("heading", "script", "module"),
    [
        ("## Demo output", "vanishing_gradients.py", demo_script),
        ("## Clipping the exploding RNN", "clipping_comparison.py", clipping_comparison),
    ],
)
def test_readme_tables_are_the_scripts_output(heading: str, script: str, module: Any) -> None:
    section = _section((ROOT / "docs" / "demo.md").read_text(encoding="utf-8"), heading)
    assert f"{script} --markdown" in section
    header = module.format_table([], markdown=True)
    assert header in section
