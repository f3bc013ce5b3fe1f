"""Rules of the whole suite that no single test can enforce on itself.

A test marked ``browser`` (``tests/browser.py``) skips, with its reason, where no browser is on PATH.
Where one is, a skip hides a test that could have run: the session fails, whatever else passed.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser import BROWSERS, MARK, find_browser

_skipped: list[str] = []  # the browser tests skipped in this session, with why


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}: drives a real browser ({', '.join(BROWSERS)} on PATH)")
    _skipped.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and MARK in report.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def _broken_rule() -> str | None:
    browser = find_browser() if _skipped else None
    if browser is None:
        return None
    return f"a browser is on PATH ({browser}), yet a browser test was skipped; it must run here:\n  " + "\n  ".join(
        _skipped
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    if _broken_rule() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: pytest.Config) -> None:
    broken = _broken_rule()
    if broken:
        terminalreporter.section("a browser test was skipped", sep="=", red=True, bold=True)
        terminalreporter.line(broken, red=True)
