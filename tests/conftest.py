"""Shared fixtures: tiny configs and real stores in temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import TrainConfig, load_train_config

# The slowest files first (their time in `pytest --durations=0`, 2026-12-08: 295 s down to 93 s), so that the
# two processes of `make test` (`--dist loadfile`: a file runs on one) never start a long file near the end.
SLOWEST_FIRST = (
    "test_sweep_faults.py",
    "test_reproducible.py",
    "test_pack.py",
    "test_sweep.py",
    "test_sweep_workers.py",
    "test_stress.py",
    "test_scale_out.py",
    "test_repeats.py",
    "test_train.py",
    "test_races.py",
    "test_ui.py",
    "test_sweep_packs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# Small enough for a CPU test, large enough to exercise logging, evaluation and traversals. No checkpoints (160 MB
# each, weights and Adam's moments) but where a test asks for them (tests/test_checkpoints.py).
TINY = (
    "data.download=false",
    "optim.batch_size=32",
    "steps=12",
    "eval_every=6",
    "log_every=3",
    "checkpoint_every=0",
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

# tests/no_skips.py: under HARNESS_NO_SKIPS=1 (CI) a skip fails; pytester runs pytest inside a test (test_no_skips.py)
pytest_plugins = ["pytester", "tests.no_skips"]
