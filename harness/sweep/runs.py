"""A trial's MLflow runs as the trial ends: what each end (`TrialEnd`) makes of them, and closing them."""

from __future__ import annotations

from enum import Enum

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import tracking
from harness.tracking import ERROR_TAG, STATE_TAG


class TrialEnd(Enum):
    """How a trial ended, and what that makes of it in both stores: its Optuna state, its run's MLflow
    status, and the run's tags (the end as `harness.state`, and the error)."""

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

    def run_tags(self, error: str | None) -> dict[str, str]:
        return {STATE_TAG: self.value, **({ERROR_TAG: error} if error else {})}


def close_trial_run(client: MlflowClient, run_id: str, end: TrialEnd, error: str | None = None) -> None:
    """Close a trial's MLflow run as the trial ended."""
    tracking.end_run(client, run_id, end.run_status, end.run_tags(error))
