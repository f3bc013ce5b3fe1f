"""A release is what it says: the version matches the changelog, and the wheel carries what users run."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning_gradguard

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_the_newest_changelog_heading() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (\d+\.\d+\.\d+)(?: — (\d{4}-\d{2}-\d{2}))?$", text, re.M)  # "Unreleased" aside
    newest, date = headings[0]
    assert newest == lightning_gradguard.__version__, "cut a release: the version string and its CHANGELOG heading"
    assert date, f"the CHANGELOG heading of {newest} has no date"


def test_the_wheel_carries_the_tab_its_plugin_entry_point_and_the_script(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the tree
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lightning_gradguard", src / "lightning_gradguard",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    # Offline when the environment already has setuptools (the build backend); otherwise pip fetches it.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("lightning_gradguard-*.whl")
    assert wheel.name.startswith(f"lightning_gradguard-{lightning_gradguard.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = z.read(entry_points).decode()
    assert "lightning_gradguard/tensorboard/static/tab.js" in names
    assert "lightning_gradguard/py.typed" in names
    assert "[tensorboard_plugins]\ngradguard = lightning_gradguard.tensorboard.plugin:GradGuardLoader" in entries
    assert "[console_scripts]\ngradguard = lightning_gradguard.cli:main" in entries
