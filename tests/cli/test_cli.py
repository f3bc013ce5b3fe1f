"""The ``gradguard`` command: its entry points, and how it starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lightning_gradguard.cli import main


def test_python_dash_m_and_the_function_are_the_same_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_gradguard", "report", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 == main(["report", str(tmp_path / "none")])
    assert "no such directory" in proc.stderr
