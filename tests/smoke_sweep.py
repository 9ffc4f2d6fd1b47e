"""One real `harness sweep studies/smoke.yaml` per test session, shared by test_report and test_ui."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = str(Path(sys.executable).parent / "harness")
STUDY_FILE = ROOT / "studies" / "smoke.yaml"
SWEEP_TIMEOUT_S = 240


@dataclass(frozen=True)
class SweepStore:
    study_file: Path
    storage: str  # Optuna
    tracking_uri: str  # MLflow
    folder: Path


def clean_env() -> dict[str, str]:
    """This environment without a tracking URI of the user's."""
    return {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}


def smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
    """Run the smoke study into stores under the session's temp folder, once per session."""
    folder = tmp_path_factory.getbasetemp() / "smoke-sweep"
    store = SweepStore(STUDY_FILE, f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}", folder)
    if not (folder / "done").exists():
        folder.mkdir(exist_ok=True)
        command = [HARNESS, "sweep", str(STUDY_FILE), "--storage", store.storage, "--tracking-uri", store.tracking_uri]
        result = subprocess.run(
            command, cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (folder / "done").touch()
    return store
