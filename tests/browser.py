"""The browser that the tab's browser test drives: found on PATH, never installed.

A test never installs system packages: that needs root and the network, changes the machine for
everything else that runs on it, and takes minutes. The test runs wherever a browser already
exists; ``.ci/run`` installs Chromium from Debian's packages before ``make test`` (best effort),
and ``tests/conftest.py`` fails the session when a browser exists and the test was skipped anyway.
"""

from __future__ import annotations

import shutil

import pytest

__all__ = ["BROWSERS", "MARK", "browser_or_skip", "find_browser"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MARK = "browser"  # the marker of the tests that drive a browser


def find_browser() -> str | None:
    """The path of the first of :data:`BROWSERS` on PATH, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_or_skip() -> str:
    """The browser's path, or a skip that says which browsers were looked for (the session fails when
    one exists and a test skipped: tests/conftest.py)."""
    found = find_browser()
    if found is None:
        pytest.skip(f"no browser on PATH (looked for {', '.join(BROWSERS)}): the tab's browser test did not run")
    return found
