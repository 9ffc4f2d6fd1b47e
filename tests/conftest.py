"""Shared fixtures: tiny configs and real stores in temporary folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.config import TrainConfig, load_train_config

# Small enough for a CPU test, large enough to exercise logging, evaluation and traversals.
TINY = (
    "data.download=false",
    "optim.batch_size=32",
    "steps=12",
    "eval_every=6",
    "log_every=3",
)


def same_on_every_machine(tmp_path: Path) -> tuple[str, ...]:
    """Overrides that leave the machine out of a run: an empty data root (the bundled subset, even where
    `data/` holds a download) and the CPU (even where there is a GPU)."""
    return (f"data.root={tmp_path / 'no-data'}", "device=cpu")


def tiny_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    """TINY on the bundled subset and the CPU, with more overrides."""
    return load_train_config(None, (*TINY, *same_on_every_machine(tmp_path), *overrides))


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> TrainConfig:
    return tiny_config(tmp_path)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def optuna_storage(tmp_path: Path) -> str:
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"


from tests.postgres import postgres  # noqa: E402, F401 - the session's PostgreSQL cluster, for any test module


# CI sets HARNESS_NO_SKIPS=1: there a skipped test (no PostgreSQL, no Chromium, no Flask-WTF) means an install
# step is missing, so it fails; a test marked may_skip skips for a reason of the machine's data, not its set-up.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("HARNESS_NO_SKIPS") == "1" and report.skipped and item.get_closest_marker("may_skip") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (HARNESS_NO_SKIPS=1): {report.longrepr}"
