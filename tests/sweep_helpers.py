"""What the sweep tests share: tiny studies written to a folder, `harness sweep` run in or out of process,
and both stores read back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from tests.worker_logs import log_tail

# Two log windows and two evaluations a trial: tiny, yet every hook runs.
TINY_TRAIN = {
    "data": {"download": False},
    "optim": {"batch_size": 16},
    "steps": 4,
    "eval_every": 2,
    "log_every": 2,
    "checkpoint_every": 0,  # 160 MB each: no sweep test resumes from one yet
}
LAMBDA_SEARCH = {"loss.lambda_cat": {"type": "float", "low": 0.5, "high": 2.0, "log": True}}
WAIT_S = 480.0  # for a sweep to reach a state or end: generous, a loaded 2-core machine starts Python slowly
# Pruning made deterministic: evaluations after the step-0 baseline at steps 2, 4, 6 (the pruner's steps 1, 2, 3), a
# loss log at each; λ_cat = 0 leaves the digit code untrained, λ_cat = 2 lifts info/mi_cat by the first evaluation.
N_WARMUP_STEPS = 2
EVAL_EVERY = 2
PRUNE_TRAIN = {
    "data": {"download": False},
    "device": "cpu",
    "optim": {"batch_size": 16},
    "steps": 6,
    "eval_every": EVAL_EVERY,
    "log_every": EVAL_EVERY,
    "checkpoint_every": 0,
}
LEARNS, IDLE = 2.0, 0.0  # loss.lambda_cat
STOPS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "interrupted (SIGTERM)")]


def write_study(folder: Path, name: str, trials: int, search: dict[str, Any], **extra: Any) -> Path:
    doc = {
        "name": name,
        "objective": {"metric": "eval/cat_acc", "direction": "maximize"},
        "trials": trials,
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "train": TINY_TRAIN,
        "search": search,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def sweep_args(study_file: Path, storage: str, tracking_uri: str, *more: str) -> list[str]:
    return ["sweep", str(study_file), "--storage", storage, "--tracking-uri", tracking_uri, *more]


def trials_of(storage: str, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def runs_of(tracking_uri: str, name: str) -> tuple[Run, list[Run]]:
    """The study's parent run and its trial runs, by trial number."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1, "one parent run per study"
    children = sorted(
        (run for run in runs if "optuna.trial" in run.data.tags), key=lambda r: int(r.data.tags["optuna.trial"])
    )
    assert len(children) + 1 == len(runs)
    return parents[0], children


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.state.is_finished() and t.number not in retried and not t.user_attrs.get("surplus")]


def assert_nothing_running(trials: list[FrozenTrial], children: list[Run], parent: Run) -> None:
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert all(run.info.status != "RUNNING" for run in [parent, *children])


def assert_trial_matches_run(trial: FrozenTrial, run: Run, study: str, parent: Run) -> None:
    assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
    assert run.info.run_name == f"trial-{trial.number:04d}"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["optuna.study"] == study
    assert run.data.tags["optuna.trial"] == str(trial.number)
    assert run.data.params["trial"] == str(trial.number)
    for key, value in trial.params.items():
        assert float(run.data.params[key]) == pytest.approx(value)


def start_sweep(study_file: Path, storage: str, tracking_uri: str, log: Path) -> subprocess.Popen[bytes]:
    """`harness sweep` as a process of its own, its output in `log`."""
    command = [sys.executable, "-m", "harness.cli", *sweep_args(study_file, storage, tracking_uri)]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=study_file.parent, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, f"sweep exited early ({process.returncode}):\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"timed out:\n{log_tail(log)}"
        time.sleep(0.2)


def trial_running(storage: str, name: str, tracking_uri: str) -> Callable[[], bool]:
    """True once a trial is RUNNING with its MLflow run. The stores are read only after the sweep has
    created both (the MLflow file comes second), so that no two processes create tables at once."""
    mlflow_file = Path(tracking_uri.removeprefix("sqlite:///"))

    def check() -> bool:
        if not mlflow_file.is_file():
            return False
        running = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,))
        return any("mlflow_run_id" in t.user_attrs for t in running)

    return check
