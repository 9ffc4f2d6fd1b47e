"""A pytest plugin: with HARNESS_NO_SKIPS=1 (CI) a skip fails, whether a test skips (in its set-up, body or
tear-down) or a module does as it is collected (`pytest.importorskip`, a module-level `pytest.skip`): there a
skip means an install step is missing. A test marked `may_skip` skips for a reason of the machine's data, not
its set-up, and still skips."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

FAILED_SKIP = "skipped where every test must run (HARNESS_NO_SKIPS=1)"


def no_skips() -> bool:
    return os.environ.get("HARNESS_NO_SKIPS") == "1"


def fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip's report into a failure that gives the skip's reason and where it was raised."""
    where = report.longrepr
    if isinstance(where, tuple):  # (path, line, "Skipped: reason")
        where = f"{where[2]} ({where[0]}:{where[1]})"
    report.outcome = "failed"
    report.longrepr = f"{FAILED_SKIP}: {where}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: may skip even where HARNESS_NO_SKIPS=1 (a fact of the machine's data, not of its set-up)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if no_skips() and report.skipped and item.get_closest_marker("may_skip") is None:
        fail(report)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped as it is collected: a collection error, before any other plugin sees the report."""
    if no_skips() and report.skipped:
        fail(report)
