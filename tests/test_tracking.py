"""`harness train` into a real MLflow SQLite store, read back with the MLflow client."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness import run_logging, tracking
from harness.cli import main
from tests.conftest import TINY, same_on_every_machine


def only_run(client: MlflowClient, experiment: str) -> mlflow.entities.Run:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None and exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_train_command_logs_params_tags_metrics_and_artifacts(tracking_uri: str, tmp_path: Path) -> None:
    args = ["train", "--tracking-uri", tracking_uri, "--experiment", "t", "--run-name", "tiny", "--quiet"]
    for override in (*TINY, *same_on_every_machine(tmp_path)):
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    client = MlflowClient(tracking_uri)
    run = only_run(client, "t")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["optim.lr_d"] == "0.0002" and run.data.params["steps"] == "12"
    assert run.data.params["codes.categorical"] == "[10]"
    assert run.data.tags["data.source"] == "bundled-10k" and run.data.tags["device"] == "cpu"
    assert run.data.tags["torch.version"] == torch.__version__

    history = client.get_metric_history(run.info.run_id, "loss/d")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/cat_acc")] == [0, 6, 12]
    assert 0 <= run.data.metrics["eval/cat_acc"] <= 1

    steps = {a.path for a in client.list_artifacts(run.info.run_id, "traversals")}
    assert steps == {f"traversals/step-{s:06d}" for s in (0, 6, 12)}
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "traversals/step-000012")}
    assert grids == {f"traversals/step-000012/{n}.png" for n in ("cat0", "con0", "con1")}

    local = Path(client.download_artifacts(run.info.run_id, "model/weights.pt", str(tmp_path)))
    weights = torch.load(local, weights_only=True)
    assert weights["latent"] == {"noise": 62, "categorical": [10], "continuous": 2}
    assert weights["q_head"]["layers.3.weight"].shape == (10 + 2 * 2, 128)
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "lr_d: 0.0002" in Path(config).read_text()


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_raises_ends_failed_or_killed(tracking_uri: str, error: BaseException, status: str) -> None:
    client = MlflowClient(tracking_uri)
    with pytest.raises(type(error)), run_logging.tracked_run(client, "t", "broken"):
        raise error
    run = only_run(client, "t")
    assert run.info.status == status
    assert run.data.tags["error"] == ("RuntimeError: boom" if status == "FAILED" else "interrupted")


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'env.db'}"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.slow
def test_sigterm_stops_harness_train_and_closes_its_run_killed(tracking_uri: str, tmp_path: Path) -> None:
    sets = ["data.download=false", *same_on_every_machine(tmp_path), "optim.batch_size=16", "steps=5000", "log_every=2"]
    command = [sys.executable, "-m", "harness.cli", "train", "--tracking-uri", tracking_uri, "--experiment", "t"]
    command += ["--quiet", *(arg for override in sets for arg in ("--set", override))]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not logged_a_loss(tracking_uri):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # as `timeout`, Kubernetes, SLURM and systemd stop a process
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    run = only_run(MlflowClient(tracking_uri), "t")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted (SIGTERM)"


def logged_a_loss(tracking_uri: str) -> bool:
    """Whether the store holds a loss (the run is training), read with sqlite3 alone: an MLflow client opened
    while `harness train` creates the store's tables would race it to create them."""
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM metrics WHERE key = 'loss/d' LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # no such table yet, or locked
        return False
