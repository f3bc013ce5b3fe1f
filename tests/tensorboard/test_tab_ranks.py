"""The tab's events table names the ranks of a data-parallel run's events (issue 31), in a real browser."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lightning_gradguard.events import GradEvent
from tests.browser import browser_or_skip
from tests.health.test_per_rank import ddp_events, write_run
from tests.helpers import get_json, tensorboard_server


@pytest.mark.browser
def test_the_events_table_has_a_ranks_column(tmp_path: Path) -> None:
    binary = browser_or_skip()
    root = tmp_path / "logs"
    write_run(root / "ddp", [*ddp_events(), GradEvent("spike", step=18, value=7.0, message="spike")])

    def ready(base: str) -> bool:
        return bool(get_json(f"{base}/data/plugin/gradguard/events?run=ddp"))

    with tensorboard_server(root, ready) as server:
        proc = subprocess.run(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
             f"{server}/data/plugin_entry.html?name=gradguard&run=ddp"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    dom = proc.stdout
    assert 'data-gg-ready="1"' in dom, proc.stderr[-2000:]
    table = dom.split('class="gg-events"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<th>([^<]*)</th>", table) == ["step", "kind", "ranks", "origin", "layers", "message"]
    rows = re.findall(r'<tr class="gg-event" data-step="(\d+)" data-kind="(\w+)">.*?<td class="gg-ranks">([^<]*)</td>',
                      table)  # fmt: skip
    assert rows == [("7", "replica_divergence", "1"), ("12", "nonfinite", "3"), ("15", "nonfinite", "2"),
                    ("18", "spike", "")]  # fmt: skip
