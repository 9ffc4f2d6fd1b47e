"""The Optuna storage on a real PostgreSQL: connection strings, a database restart waited out (calls,
heartbeats, the study lock), a database that stays away (one clear error)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from click.testing import CliRunner

from harness.cli import main
from harness.sweep import storage as sweep_storage
from harness.sweep.lock import study_lock
from harness.sweep.outage import StorageUnavailable
from harness.sweep.spec import Heartbeat
from harness.sweep.trial import heartbeat
from tests.postgres import Postgres
from tests.sweep_helpers import LAMBDA_SEARCH, sweep_args, write_study

OUTAGE_S = 3.0
WAIT_S = 60.0  # for a condition on a loaded machine


def last_heartbeat(url: str, trial_id: int) -> float:
    """The database's time of a trial's last heartbeat, in seconds since the epoch."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            query = "SELECT EXTRACT(EPOCH FROM heartbeat) FROM trial_heartbeats WHERE trial_id = :id"
            return float(connection.execute(sqlalchemy.text(query), {"id": trial_id}).scalar_one())
    finally:
        engine.dispose()


def database_now(url: str) -> float:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return float(connection.execute(sqlalchemy.text("SELECT EXTRACT(EPOCH FROM now())")).scalar_one())
    finally:
        engine.dispose()


def restart_in_background(postgres: Postgres, down_s: float) -> threading.Thread:
    """Stop PostgreSQL at once (cutting every connection), start it again `down_s` later (the outage itself);
    return once it has stopped."""
    stopped = threading.Event()

    def restart() -> None:
        postgres.stop("fast")  # pg_ctl -w: returns once the server has shut down
        stopped.set()
        time.sleep(down_s)
        postgres.start()

    thread = threading.Thread(target=restart, name="restart-postgres")
    thread.start()
    assert stopped.wait(WAIT_S), "PostgreSQL did not stop"
    return thread


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_storage_calls_and_heartbeats_outlast_a_database_restart(postgres: Postgres) -> None:
    url = postgres.create_database("restart")
    sweep_storage.quiet_optuna()
    storage = sweep_storage.open_storage(url, Heartbeat(interval_s=1, grace_s=30))
    study = optuna.create_study(study_name="restart", storage=storage, direction="maximize")
    trial = study.ask()
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("restart"), 0)
    with heartbeat(storage, study, trial.number, interval_s=1):
        trial.report(0.1, 1)
        restart = restart_in_background(postgres, OUTAGE_S)  # stopped: the calls below wait for it
        started = time.monotonic()
        trial.report(0.2, 2)
        trial.set_user_attr("after", "restart")
        waited = time.monotonic() - started
        restart.join()
        back = database_now(url)
        wait_until(lambda: last_heartbeat(url, trial_id) > back, "a heartbeat after the restart")
    study.tell(trial, 0.3)

    assert waited > 1.0, "the calls did not meet the outage"
    (done,) = optuna.load_study(study_name="restart", storage=url).get_trials()
    assert done.state == optuna.trial.TrialState.COMPLETE and done.value == 0.3
    assert done.intermediate_values == {1: 0.1, 2: 0.2} and done.user_attrs == {"after": "restart"}


@pytest.mark.slow
def test_the_study_lock_waits_for_a_restarting_database(postgres: Postgres) -> None:
    url = postgres.create_database("lock")
    storage = sweep_storage.open_storage(url)
    restart = restart_in_background(postgres, OUTAGE_S)  # stopped
    started = time.monotonic()
    with study_lock(storage, url, "lock"):
        waited = time.monotonic() - started
        assert storage.get_all_studies() == []
    restart.join()
    assert waited > 1.0, "the lock did not meet the outage"


@pytest.mark.slow
def test_a_database_that_stays_away_is_one_clear_error(postgres: Postgres) -> None:
    url = postgres.create_database("away")
    sweep_storage.quiet_optuna()
    storage = sweep_storage.open_storage(url)
    storage.outage_s = 2.0
    optuna.create_study(study_name="away", storage=storage)
    postgres.stop("fast")
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as raised:
            storage.get_all_studies()
        assert 2.0 <= time.monotonic() - started < 60.0  # its 2 s, not the default STORAGE_OUTAGE_S of 120 s
    finally:
        postgres.start()
    shown = url.replace(postgres.password, "***")
    message = str(raised.value)
    assert message.startswith(f"the Optuna storage {shown} did not answer for 2 s: (psycopg2.OperationalError) ")
    assert "Connection refused" in message and "\n" not in message and postgres.password not in message
    assert [s.study_name for s in storage.get_all_studies()] == ["away"]  # and it is back


def test_a_missing_driver_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "driver", 2, LAMBDA_SEARCH)
    url = "postgresql+psycopg://harness:secret@127.0.0.1:9/optuna"  # psycopg 3: not what the extra installs
    result = CliRunner().invoke(main, sweep_args(study_file, url, f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert result.exit_code == 2
    assert result.output == (
        "error: --storage: postgresql+psycopg://harness:***@127.0.0.1:9/optuna: postgresql+psycopg:// needs the "
        "Python module 'psycopg', which is not installed: use postgresql+psycopg2:// after pip install -e "
        "'.[postgres]'\n"
    )
    result = CliRunner().invoke(main, sweep_args(study_file, f"sqlite:///{tmp_path / 'optuna.db'}", url))
    assert result.exit_code == 2
    assert result.output.startswith("error: --tracking-uri: postgresql+psycopg://harness:***@127.0.0.1:9/optuna: ")
    assert not (tmp_path / "optuna.db").exists(), "a store was touched before the tracking URI was checked"
