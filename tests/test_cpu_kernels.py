"""The tests that compare with numbers recorded on another machine pass whatever kernels torch picks.

Torch chooses its CPU kernels by the instructions the CPU has (``torch.backends.cpu.get_cpu_capability``),
so the next machine may run code paths that this one never used: AVX-512 here, AVX2 or the plain
``default`` path there. ``ATEN_CPU_CAPABILITY`` forces a lower one (it is read when torch loads, hence
a subprocess). Each audited test runs here under ``default`` and ``avx2`` too, so that a kernel change
cannot surprise CI on another CPU. The audited tests, and what each compares:

* ``tests/integrations/test_checkpoint_compat.py``: the 0.2.0 continuation's decisions exactly (skips,
  non-finite steps, events' kinds, steps, origins, layers and actions, whether a clip applied, every
  counter), its floats (metrics, event values, the guard's statistics) within ``tests/recorded.py``'s
  relative tolerance, numbers in messages by value;
* ``tests/tensorboard/test_eventfile_compat.py`` (the CLI): only *reads* recorded event files, so it
  compares exactly, and must read them the same under any kernel;
* the doctests that print floats (``clip/norm.py``, ``clip/zclip.py``, ``core/updates.py``,
  ``core/timesteps.py``): they print values that are exact in float32 or rounded to 4 to 6 digits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDITED = [
    "tests/integrations/test_checkpoint_compat.py",
    "tests/tensorboard/test_eventfile_compat.py::test_the_cli_reads_an_older_event_file_as_it_did",
    "tests/recorded.py",
    "lightning_gradguard/clip/norm.py",
    "lightning_gradguard/clip/zclip.py",
    "lightning_gradguard/core/updates.py",
    "lightning_gradguard/core/timesteps.py",
]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_audited_tests_pass_under_other_cpu_kernels(capability: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    check = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    chosen = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
    if capability == "avx2" and chosen.stdout.strip() == "DEFAULT":
        pytest.skip("this CPU has no AVX2: torch runs its default kernels, tested by the other case")
    assert chosen.stdout.strip() == capability.upper(), chosen.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *AUDITED],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
