"""Sweep-level faults and their mixes, with real `harness sweep` processes and stores: a pack killed outright, a
pack member pruned beside a mate that goes on, pruning on the seeds' aggregate, a PostgreSQL outage longer
than the storage waits, and the report of a real two-objective sweep."""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from harness.cli import main
from harness.sweep.outage import OUTAGE_ENV
from tests.postgres import Postgres
from tests.sweep_helpers import (
    EVAL_EVERY,
    IDLE,
    LAMBDA_SEARCH,
    LEARNS,
    N_WARMUP_STEPS,
    PRUNE_TRAIN,
    TINY_TRAIN,
    WAIT_S,
    assert_nothing_running,
    counted_trials,
    runs_of,
    sweep_args,
    trials_of,
    wait_for,
    write_study,
)

PRUNING = {"type": "median", "n_startup_trials": 1, "n_warmup_steps": N_WARMUP_STEPS}
MI_CAT = {"metric": "info/mi_cat", "direction": "maximize"}  # see tests/test_sweep_pruning.py: λ_cat = 0 keeps it ~0


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled data's fallback, and nothing written into the repository


def start_sweep(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`harness ARGS` as a process of its own, its output in `log`."""
    with log.open("wb") as out:
        command = [sys.executable, "-m", "harness.cli", *args]
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def running_trials(storage: str, name: str, tracking_uri: str) -> list[FrozenTrial]:
    """The study's RUNNING trials that have their MLflow run; none before the sweep made both stores (the
    MLflow store comes second), so that no two processes create tables at once."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return []
    running = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,))
    return [t for t in running if "mlflow_run_id" in t.user_attrs]


def sweep(*args: str) -> str:
    """`harness ARGS` in this process: its output, once it exited 0."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def history(client: MlflowClient, run_id: str, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def by_run_id(children: list[Run]) -> dict[str, Run]:
    return {run.info.run_id: run for run in children}


def assert_retried_once(trials: list[FrozenTrial], lost: list[int], children: list[Run]) -> None:
    """Each lost trial failed, its run KILLED as LOST, and one retry with its params completed in its place."""
    runs = by_run_id(children)
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(lost)
    for trial in (trials[number] for number in lost):
        assert trial.state == TrialState.FAIL
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["harness.state"] == "LOST"
        (retry,) = (t for t in retries if t.user_attrs["retry_of"] == trial.number)
        assert retry.state == TrialState.COMPLETE and retry.params == trial.params
        retry_run = runs[retry.user_attrs["mlflow_run_id"]]
        assert retry_run.info.status == "FINISHED" and retry_run.data.tags["harness.retry_of"] == str(trial.number)
    assert sorted(t.number for t in counted_trials(trials)) == sorted(t.number for t in retries)


@pytest.mark.slow
def test_a_pack_killed_outright_is_retried_whole_on_the_next_start(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """SIGKILL once both trials of a pack of 2 are past their first evaluation, then the same command again."""
    long_enough = {**TINY_TRAIN, "steps": 8}  # three evaluations after the first: the kill lands while it trains
    study_file = write_study(tmp_path, "kill-pack", 2, LAMBDA_SEARCH, train=long_enough)
    args = sweep_args(study_file, optuna_storage, tracking_uri, "--pack", "2")
    log = tmp_path / "first.log"
    process = start_sweep(args, tmp_path, log)
    try:

        def both_evaluated() -> bool:
            running = running_trials(optuna_storage, "kill-pack", tracking_uri)
            return len(running) == 2 and all(1 in t.intermediate_values for t in running)

        wait_for(both_evaluated, process, log)
    finally:
        process.kill()
        process.wait()
    lost = trials_of(optuna_storage, "kill-pack")
    assert [t.state for t in lost] == [TrialState.RUNNING] * 2, "the kill did not land while the pack trained"

    output = sweep(*args)
    assert all(f"trial {t.number} LOST" in output for t in lost)
    trials = trials_of(optuna_storage, "kill-pack")
    assert len(trials) == 4 and len(counted_trials(trials)) == 2
    parent, children = runs_of(tracking_uri, "kill-pack")
    assert_retried_once(trials, [t.number for t in lost], children)
    client = MlflowClient(tracking_uri)
    for trial in lost:  # each was killed after its first evaluation, and said so before it died
        assert 2 in history(client, trial.user_attrs["mlflow_run_id"], "eval/cat_acc")
    retried = [run for run in children if "harness.retry_of" in run.data.tags]
    assert [run.data.tags["harness.pack"] for run in retried] == ["2", "2"]  # the retries trained as a pack again
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_a_pruned_member_leaves_the_pack_and_its_mate_trains_to_the_end(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """Trial 0 (λ_cat 0.5) completes alone, for the median pruner to compare with; then λ_cat 0 and 2 train
    as a pack of 2: the idle one is pruned at the end of the warmup, the learner (well above trial 0 at every
    evaluation) goes on to the last step."""
    modest = 0.5
    study_file = write_study(
        tmp_path,
        "prune-pack",
        3,
        {"loss.lambda_cat": {"type": "categorical", "choices": [modest, IDLE, LEARNS]}},
        objective=MI_CAT,
        sampler={"type": "grid", "seed": 1},
        pruner=PRUNING,
        train=PRUNE_TRAIN,
    )
    sweep(*sweep_args(study_file, optuna_storage, tracking_uri, "--trials", "1"))
    output = sweep(*sweep_args(study_file, optuna_storage, tracking_uri, "--pack", "2"))

    trials = trials_of(optuna_storage, "prune-pack")
    first = trials[0]
    assert first.params["loss.lambda_cat"] == modest, "the grid's seed 1 changed its order"
    (idle,) = (t for t in trials if t.params["loss.lambda_cat"] == IDLE)
    (mate,) = (t for t in trials if t.params["loss.lambda_cat"] == LEARNS)
    assert (first.state, idle.state, mate.state) == (TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE)
    assert f"trial {idle.number} PRUNED at evaluation {N_WARMUP_STEPS}" in output
    assert sorted(idle.intermediate_values) == list(range(1, N_WARMUP_STEPS + 1))
    assert sorted(mate.intermediate_values) == [1, 2, 3] and mate.value == pytest.approx(mate.intermediate_values[3])

    parent, children = runs_of(tracking_uri, "prune-pack")
    runs = by_run_id(children)
    pruned_run, mate_run = runs[idle.user_attrs["mlflow_run_id"]], runs[mate.user_attrs["mlflow_run_id"]]
    assert pruned_run.data.tags["harness.pack"] == mate_run.data.tags["harness.pack"] == "2"
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["harness.state"] == "PRUNED"
    assert mate_run.info.status == "FINISHED" and mate_run.data.tags["harness.state"] == "COMPLETE"
    client = MlflowClient(tracking_uri)
    pruned_at, last = N_WARMUP_STEPS * EVAL_EVERY, 3 * EVAL_EVERY
    assert PRUNE_TRAIN["steps"] == last
    assert sorted(history(client, pruned_run.info.run_id, "eval/cat_acc")) == list(range(0, pruned_at + 1, EVAL_EVERY))
    assert max(history(client, pruned_run.info.run_id, "loss/d")) == pruned_at
    assert sorted(history(client, mate_run.info.run_id, "eval/cat_acc")) == list(range(0, last + 1, EVAL_EVERY))
    assert max(history(client, mate_run.info.run_id, "loss/d")) == last
    mate_last_logged = max(m.timestamp for m in client.get_metric_history(mate_run.info.run_id, "loss/d"))
    assert pruned_run.info.end_time < mate_last_logged  # closed when it left the pack, not at the pack's end
    assert parent.data.metrics["trials/pruned"] == 1 and parent.data.metrics["trials/complete"] == 2
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_pruning_with_repeats_judges_the_seeds_aggregate(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """Two seeds a trial, their mean reported at each evaluation; the idle trial is pruned with both seeds."""
    study_file = write_study(
        tmp_path,
        "prune-seeds",
        2,
        {"loss.lambda_cat": {"type": "categorical", "choices": [IDLE, LEARNS]}},
        objective=MI_CAT,
        sampler={"type": "grid", "seed": 0},
        pruner=PRUNING,
        train=PRUNE_TRAIN,
        repeats=2,
        aggregate="mean",
    )
    sweep(*sweep_args(study_file, optuna_storage, tracking_uri))

    trials = trials_of(optuna_storage, "prune-seeds")
    assert [t.params["loss.lambda_cat"] for t in trials] == [LEARNS, IDLE], "the grid's seed 0 changed its order"
    learner, idle = trials
    assert learner.state == TrialState.COMPLETE and idle.state == TrialState.PRUNED
    assert sorted(learner.intermediate_values) == [1, 2, 3]
    assert sorted(idle.intermediate_values) == list(range(1, N_WARMUP_STEPS + 1))
    parent, children = runs_of(tracking_uri, "prune-seeds")
    client = MlflowClient(tracking_uri)
    for trial in trials:
        trial_run = trial.user_attrs["mlflow_run_id"]
        seed_runs = [run for run in children if run.data.tags.get("mlflow.parentRunId") == trial_run]
        assert sorted(run.data.params["seed"] for run in seed_runs) == ["0", "1"]
        per_seed = [history(client, run.info.run_id, "info/mi_cat") for run in seed_runs]
        for evaluation, value in trial.intermediate_values.items():
            step = evaluation * EVAL_EVERY
            assert per_seed[0][step] != pytest.approx(per_seed[1][step])  # two seeds, two values: which one counts
            assert value == pytest.approx(statistics.mean(seeds[step] for seeds in per_seed))
            assert history(client, trial_run, "info/mi_cat")[step] == pytest.approx(value)
        if trial is idle:  # pruned: every seed's run closed as pruned, at the evaluation that pruned it
            for run in seed_runs:
                assert run.info.status == "KILLED" and run.data.tags["harness.state"] == "PRUNED"
                assert max(history(client, run.info.run_id, "loss/d")) == N_WARMUP_STEPS * EVAL_EVERY
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_a_database_outage_longer_than_the_wait_stops_the_sweep_and_the_next_start_retries(
    tmp_path: Path, postgres: Postgres, tracking_uri: str
) -> None:
    """PostgreSQL stopped mid-trial, with HARNESS_STORAGE_OUTAGE_S=2: the sweep exits 1 with one line; once the
    database is back, the same command again fails the trial as lost and its retry completes the study."""
    storage = postgres.create_database("outage")
    study_file = write_study(tmp_path, "outage", 1, LAMBDA_SEARCH, train={**TINY_TRAIN, "steps": 8})
    args = sweep_args(study_file, storage, tracking_uri)
    log = tmp_path / "first.log"
    process = start_sweep(args, tmp_path, log, env={**os.environ, OUTAGE_ENV: "2"})
    try:
        wait_for(lambda: bool(running_trials(storage, "outage", tracking_uri)), process, log)
        postgres.stop("fast")
        try:
            assert process.wait(timeout=WAIT_S) == 1, log.read_text()
        finally:
            postgres.start()
    finally:
        process.kill()
        process.wait()
    shown = storage.replace(postgres.password, "***")
    errors = [line for line in log.read_text().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"error: the Optuna storage {shown} did not answer for 2 s: ")
    assert postgres.password not in log.read_text()
    (lost,) = trials_of(storage, "outage")
    assert lost.state == TrialState.RUNNING  # nothing could record its end

    sweep(*args)
    trials = trials_of(storage, "outage")
    assert len(trials) == 2 and len(counted_trials(trials)) == 1
    parent, children = runs_of(tracking_uri, "outage")
    assert_retried_once(trials, [lost.number], children)
    assert parent.info.status == "FINISHED"
    assert_nothing_running(trials, children, parent)


def test_a_bad_outage_wait_is_one_line_before_any_store_is_touched(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    study_file = write_study(tmp_path, "bad-wait", 1, LAMBDA_SEARCH)
    for value in ("soon", "0", "nan"):
        result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri), env={OUTAGE_ENV: value})
        assert result.exit_code == 2
        assert result.output == f"error: {OUTAGE_ENV}: must be a positive number of seconds, not {value!r}\n"
    assert not any((tmp_path / "mlruns").iterdir())


@pytest.mark.slow
def test_report_of_a_two_objective_sweep_puts_the_pareto_front_first(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    objectives: list[dict[str, Any]] = [
        {"metric": "eval/cat_acc", "direction": "maximize"},
        {"metric": "eval/fld", "direction": "minimize"},
    ]
    study_file = write_study(tmp_path, "pareto", 5, LAMBDA_SEARCH)
    doc = yaml.safe_load(study_file.read_text(encoding="utf-8"))
    del doc["objective"]
    study_file.write_text(yaml.safe_dump({**doc, "objectives": objectives}, sort_keys=False), encoding="utf-8")
    sweep(*sweep_args(study_file, optuna_storage, tracking_uri))

    result = CliRunner().invoke(
        main, ["report", str(study_file), "--storage", optuna_storage, "--tracking-uri", tracking_uri, "-o", "-"]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    study = optuna.load_study(study_name="pareto", storage=optuna_storage)
    front = {trial.number for trial in study.best_trials}
    assert 0 < len(front) < len(study.trials), "every trial on the front: nothing to order"
    assert set(table["trial"][: len(front)]) == front
    rest = sorted((t for t in study.trials if t.number not in front), key=lambda t: -t.values[0])
    assert list(table["trial"][len(front) :]) == [t.number for t in rest]  # then the others, by the first objective
    for trial in study.trials:
        row = table.set_index("trial").loc[trial.number]
        assert [row["value_0"], row["value_1"]] == pytest.approx(trial.values)
