"""Workers that start, claim and end at the same instant: the study lock keeps their moves apart, so one
study and one parent run are made, no place is taken twice, and the parent run is closed once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.sweep_helpers import (
    LAMBDA_SEARCH,
    TINY_TRAIN,
    WAIT_S,
    assert_nothing_running,
    counted_trials,
    runs_of,
    sweep_args,
    trials_of,
    write_study,
)

HOLDER = textwrap.dedent(
    """
    import sys, time
    from harness.sweep.lock import study_lock
    from harness.sweep.storage import open_storage
    url, log = sys.argv[1], sys.argv[2]
    storage = open_storage(url)
    for _ in range(3):
        with study_lock(storage, url, "race"):
            with open(log, "a") as out:
                out.write("in\\n")
                out.flush()
                time.sleep(0.2)
                out.write("out\\n")
    """
)


def test_the_study_lock_lets_one_process_in_at_a_time(tmp_path: Path, optuna_storage: str) -> None:
    log = tmp_path / "log"
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, optuna_storage, str(log)]) for _ in range(3)]
    assert [holder.wait(timeout=WAIT_S) for holder in holders] == [0, 0, 0]
    assert log.read_text().split() == ["in", "out"] * 9  # never two inside at once


@pytest.mark.slow
def test_three_sweeps_started_together_make_one_study_one_parent_and_close_it_once(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    study_file = write_study(tmp_path, "crowd", 4, LAMBDA_SEARCH, train={**TINY_TRAIN, "device": "cpu"})
    command = [sys.executable, "-m", "harness.cli", *sweep_args(study_file, optuna_storage, tracking_uri)]
    logs = [tmp_path / f"sweep-{i}.log" for i in range(3)]
    processes = []
    for log in logs:
        with log.open("wb") as out:
            processes.append(subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=WAIT_S) for process in processes]
    assert codes == [0, 0, 0], "\n".join(log.read_text() for log in logs)

    trials = trials_of(optuna_storage, "crowd")
    assert len(counted_trials(trials)) == 4 and len(trials) == 4, "no surplus trial: places are claimed in turn"
    parent, children = runs_of(tracking_uri, "crowd")  # asserts a single parent run
    assert parent.info.status == "FINISHED" and parent.data.tags["harness.closed_with"] == "4"
    assert parent.data.metrics["trials/complete"] == 4
    assert sorted(run.data.tags["optuna.trial"] for run in children) == ["0", "1", "2", "3"]
    assert_nothing_running(trials, children, parent)
    history = MlflowClient(tracking_uri).get_metric_history(parent.info.run_id, "trials/complete")
    assert [m.value for m in history] == [4.0], "the summary was written once"
