"""Pruning inside a real `harness sweep`, read back from both stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from tests.sweep_helpers import (
    EVAL_EVERY,
    IDLE,
    LEARNS,
    N_WARMUP_STEPS,
    PRUNE_TRAIN,
    assert_nothing_running,
    runs_of,
    sweep_args,
    trials_of,
    write_study,
)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled data's fallback, and nothing written into the repository


def test_a_trial_that_learns_nothing_is_pruned_once_the_warmup_ends(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """The objective info/mi_cat = ln 10 - CE of Q's digit code: λ_cat = 0 leaves that head untrained, so it
    stays within a few hundredths of 0 nats, while λ_cat = 2 lifts it to ~0.4 nats by the first evaluation,
    a margin no CPU's rounding closes. The grid's seed 0 runs λ_cat = 2 first, so the median pruner (one
    startup trial) has it to compare with."""
    study_file = write_study(
        tmp_path,
        "prune",
        2,
        {"loss.lambda_cat": {"type": "categorical", "choices": [IDLE, LEARNS]}},
        objective={"metric": "info/mi_cat", "direction": "maximize"},
        sampler={"type": "grid", "seed": 0},
        pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": N_WARMUP_STEPS},
        train=PRUNE_TRAIN,
    )
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output

    trials = trials_of(optuna_storage, "prune")
    assert [t.params["loss.lambda_cat"] for t in trials] == [LEARNS, IDLE], "the grid's seed 0 changed its order"
    learner, idle = trials
    assert learner.state == TrialState.COMPLETE and idle.state == TrialState.PRUNED
    assert sorted(learner.intermediate_values) == [1, 2, 3]
    # worse by a wide margin from its first evaluation on, yet pruned only at evaluation n_warmup_steps, the
    # earliest Optuna's median pruner prunes (steps below n_warmup_steps are the warmup)
    assert all(value < learner.intermediate_values[step] - 0.2 for step, value in idle.intermediate_values.items())
    assert sorted(idle.intermediate_values) == list(range(1, N_WARMUP_STEPS + 1))
    assert idle.last_step == N_WARMUP_STEPS
    assert f"trial {idle.number} PRUNED at evaluation {N_WARMUP_STEPS}" in result.output

    parent, children = runs_of(tracking_uri, "prune")
    runs = {run.info.run_id: run for run in children}
    pruned_run = runs[idle.user_attrs["mlflow_run_id"]]
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["harness.state"] == "PRUNED"
    assert runs[learner.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    for trial in trials:
        history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "info/mi_cat")
        assert {m.step // EVAL_EVERY: m.value for m in history} == pytest.approx(trial.intermediate_values)
    # the pruned run stopped at the evaluation that pruned it: no training step and no evaluation after it
    pruned_at = N_WARMUP_STEPS * EVAL_EVERY
    evaluated = [m.step for m in client.get_metric_history(pruned_run.info.run_id, "eval/cat_acc")]
    assert evaluated == list(range(0, pruned_at + 1, EVAL_EVERY))
    assert max(m.step for m in client.get_metric_history(pruned_run.info.run_id, "loss/d")) == pruned_at
    assert parent.data.metrics["trials/pruned"] == 1 and parent.data.metrics["trials/complete"] == 1
    assert_nothing_running(trials, children, parent)
