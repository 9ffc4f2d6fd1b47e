"""The sweep engine alone under load (issue 8, item 7): 8 worker processes and 200 very short trials on
PostgreSQL, each trial "trained" by tests/engine_load.py's `stub_trainer` (a stub, in this test only). No trial
is lost or run twice, in Optuna or MLflow; each database's connections stay within 5 a process."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import tracking
from harness.sweep import bookkeeping
from harness.sweep import study as sweep_study
from tests.engine_load import OBJECTIVE, STUDY, run_load, stub_value, worker_log
from tests.postgres import Postgres
from tests.worker_logs import failed_workers

WORKERS = 8
TRIALS = 200
# Each process (the 8 workers and the coordinator, this one) needs at most 5 connections to each database: a
# worker runs one trial at a time, its heartbeat and its MLflow logger beside it. Measured: 18 of each at most.
CONNECTIONS_PER_PROCESS = 5
CONNECTION_BOUND = (WORKERS + 1) * CONNECTIONS_PER_PROCESS  # 45 to each database
LOAD_TIMEOUT_S = 600  # the workers' deadline; measured: 3.5 to 4.5 min on the 2-core CPU machine under other jobs


@pytest.mark.slow
@pytest.mark.timeout(LOAD_TIMEOUT_S + 100)
def test_eight_workers_run_200_stub_trials_on_postgresql_each_once(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing written into the repository
    optuna_url, mlflow_url = postgres.create_database("load_optuna"), postgres.create_database("load_mlflow")
    result = run_load(optuna_url, mlflow_url, tmp_path, WORKERS, TRIALS, LOAD_TIMEOUT_S)
    print(f"\n{result.json_line()}")
    print(f"{TRIALS} stub trials, {WORKERS} workers: {result.wall_s} s wall, {result.trials_per_s} trials/s")
    logs = [worker_log(tmp_path, i) for i in range(WORKERS)]
    assert result.exit_codes == [0] * WORKERS, failed_workers(result.exit_codes, logs)

    study = sweep_study.load_existing_study(optuna_url, STUDY, "--storage", "--name")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(TRIALS)), "a trial lost, or one too many"
    assert all(t.state == TrialState.COMPLETE for t in trials), {t.number: t.state for t in trials}
    assert not any(bookkeeping.RETRY_ATTR in t.user_attrs or bookkeeping.SURPLUS_ATTR in t.user_attrs for t in trials)

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert runs.token is None and len(runs) == TRIALS + 1
    (parent,) = [run for run in runs if run.data.tags.get(tracking.ROLE_TAG) == "study"]
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.CLOSED_TAG] == str(TRIALS)
    closings = client.get_metric_history(parent.info.run_id, "trials/complete")
    assert [(m.step, m.value) for m in closings] == [(TRIALS, TRIALS)], "the parent run closed more than once"

    children = [run for run in runs if run.info.run_id != parent.info.run_id]
    numbers = [run.data.tags[tracking.TRIAL_TAG] for run in children]
    assert sorted(numbers, key=int) == [str(n) for n in range(TRIALS)], "a trial's run missing or made twice"
    by_id = {run.info.run_id: run for run in children}
    for trial in trials:
        run = by_id[trial.user_attrs[bookkeeping.RUN_ATTR]]
        assert run.data.tags[tracking.TRIAL_TAG] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATE_TAG] == "COMPLETE"
        assert run.data.metrics[OBJECTIVE] == pytest.approx(stub_value(trial.params["loss.lambda_cat"], 1.0))
        assert run.data.metrics[OBJECTIVE] == trial.value
        assert len(client.get_metric_history(run.info.run_id, OBJECTIVE)) == 3  # steps 0, 2 and 4, once each

    for database in ("optuna", "mlflow"):
        assert 0 < result.max_connections[database] <= CONNECTION_BOUND, result
    assert result.max_connections_together <= 2 * CONNECTION_BOUND < result.cluster_max_connections, result
