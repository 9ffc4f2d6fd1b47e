"""Closing a trial's MLflow run, on real stores (SQLite and PostgreSQL): once, the first end standing, and never
an error when another closer writes the same run at the same moment (MLflow writes a tag as select-then-insert,
so two first writes of one tag at once fail the second: the race that killed a worker of the stress test)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness import tracking
from harness.sweep.runs import TrialEnd, close_trial_run
from tests.postgres import Postgres

RACES = 30  # runs, each closed by two threads released at once


def new_trial_run(client: MlflowClient, number: int = 0) -> str:
    return tracking.start_trial_run(client, "closing", "", number, {})


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> MlflowClient:
    if request.param == "sqlite":
        return tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    postgres: Postgres = request.getfixturevalue("postgres")
    return tracking.client_for(postgres.create_database("closing"))


def test_a_second_close_with_the_same_end_goes_on_quietly(client: MlflowClient) -> None:
    run_id = new_trial_run(client)
    close_trial_run(client, run_id, TrialEnd.LOST, "its worker process 7 is gone")
    ended = client.get_run(run_id).info.end_time
    close_trial_run(client, run_id, TrialEnd.LOST, "failed as lost meanwhile")
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", ended)
    assert run.data.tags[tracking.STATE_TAG] == "LOST"
    assert run.data.tags[tracking.ERROR_TAG] == "its worker process 7 is gone"


def test_the_first_end_stands(client: MlflowClient) -> None:
    run_id = new_trial_run(client)
    close_trial_run(client, run_id, TrialEnd.COMPLETE)
    close_trial_run(client, run_id, TrialEnd.FAIL, "late")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STATE_TAG] == "COMPLETE"
    assert tracking.ERROR_TAG not in run.data.tags


def test_a_close_its_closer_left_half_done_is_finished_with_its_end(client: MlflowClient) -> None:
    run_id = new_trial_run(client)
    client.set_tag(run_id, tracking.STATE_TAG, "PRUNED")  # the closer died before it ended the run
    close_trial_run(client, run_id, TrialEnd.FAIL, "recovered")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.STATE_TAG] == "PRUNED"


def race(closers: list[Callable[[], None]]) -> list[BaseException]:
    """Run the closers in threads released at once; what they raised."""
    start, errors = threading.Barrier(len(closers)), []

    def run(close: Callable[[], None]) -> None:
        start.wait()
        try:
            close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(close,)) for close in closers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.slow
def test_two_closers_at_once_never_fail(client: MlflowClient) -> None:
    """No study lock here (as on a storage that has none): each run closed by two clients at the same moment,
    with different ends. Neither raises, and each run ends closed with one of the two ends. (That the status
    always agrees with the recorded end is what the study's lock adds: test_the_first_end_stands.)"""
    other = MlflowClient(client.tracking_uri)
    for number in range(RACES):
        run_id = new_trial_run(client, number)
        errors = race(
            [
                lambda run_id=run_id: close_trial_run(client, run_id, TrialEnd.COMPLETE),
                lambda run_id=run_id: close_trial_run(other, run_id, TrialEnd.LOST, "its heartbeat went stale"),
            ]
        )
        assert not errors, errors
        run = client.get_run(run_id)
        assert run.data.tags[tracking.STATE_TAG] in ("COMPLETE", "LOST")
        assert run.info.status in ("FINISHED", "KILLED")
