"""Shared fixtures: tiny configs and real stores in temporary folders."""

from __future__ import annotations

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


@pytest.fixture
def tiny_cfg() -> TrainConfig:
    return load_train_config(None, TINY)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def optuna_storage(tmp_path: Path) -> str:
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
