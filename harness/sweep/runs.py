"""A trial's MLflow runs as the trial ends: what each end (`TrialEnd`) makes of them, and closing them."""

from __future__ import annotations

from enum import Enum

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.tracking import ERROR_TAG, STATE_TAG


class TrialEnd(Enum):
    """How a trial ended, and what that makes of it in both stores: its Optuna state, its run's MLflow
    status, and its run's tag `harness.state`."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"  # by the trial itself: an error, a diverging loss
    INTERRUPTED = "INTERRUPTED"  # Ctrl-C: retried on the next start
    LOST = "LOST"  # its worker died: retried

    @property
    def optuna_state(self) -> TrialState:
        return TrialState[self.value] if self in (TrialEnd.COMPLETE, TrialEnd.PRUNED) else TrialState.FAIL

    @property
    def run_status(self) -> str:
        status = {TrialEnd.COMPLETE: RunStatus.FINISHED, TrialEnd.FAIL: RunStatus.FAILED}
        status[TrialEnd.INTERRUPTED] = RunStatus.FAILED
        return RunStatus.to_string(status.get(self, RunStatus.KILLED))  # pruned and lost runs were stopped


def close_trial_run(client: MlflowClient, run_id: str, end: TrialEnd, error: str | None = None) -> None:
    """Close a trial's MLflow run as the trial ended, once: the first end recorded (its `harness.state`, written
    before the run is ended) stands. A close that finds the run closed already goes on quietly, whatever end it
    brings; one that finds the state written but the run still RUNNING (its closer died between the two)
    finishes that close. The sweep's closers hold the study's lock (`Sweep.lock`), so two never close one run
    at once. Without it (a storage that has no lock), a close that loses the race to write the state (MLflow
    writes a tag as select-then-insert, so the second of two first writes fails) goes on with the winner's."""
    if client.get_run(run_id).data.tags.get(STATE_TAG) is None:
        try:
            client.set_tag(run_id, STATE_TAG, end.value)
            if error:
                client.set_tag(run_id, ERROR_TAG, error[:5000])
        except MlflowException:
            if client.get_run(run_id).data.tags.get(STATE_TAG) is None:
                raise  # not another closer's write: a real error
    run = client.get_run(run_id)
    status = TrialEnd(run.data.tags[STATE_TAG]).run_status
    if run.info.status != status:
        client.set_terminated(run_id, status=status)
