"""Trial bookkeeping in Optuna: the attribute names, which trials count towards `trials`, retries.

Counting. A study is done when it holds `trials` counted trials: COMPLETE, PRUNED, or FAIL by the trial
itself (an error, a diverging loss). A trial lost to its worker (killed, or interrupted by Ctrl-C) is FAIL
too, but a retry with the same params is enqueued carrying user attr `retry_of` = the lost trial's number;
the lost trial then no longer counts, its retry does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

# Optuna trial user attrs
RUN_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # {"host", "pid", "started"}: the process running the trial
RETRY_ATTR = "retry_of"  # on a retry: the number of the lost trial it replaces
LOST_ATTR = "lost_because"  # on a retry: why the trial it replaces was lost, when its worker could not say
ERROR_ATTR = "error"
SEEDS_ATTR = "seeds"  # with repeats: {"seeds": [...], "values": [[each objective] per seed]}
SURPLUS_ATTR = "surplus"  # asked in a race for the last place: failed before training, never counted
# Optuna study user attrs
PARENT_ATTR = "mlflow_parent_run_id"
SPEC_ATTR = "harness.spec"  # StudySpec.fingerprint() of the study's first run


def lost_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the trials a retry replaces."""
    return {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}


def places(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that take one of the study's `trials` places: all but lost and surplus ones."""
    lost = lost_numbers(trials)
    return [t for t in trials if t.number not in lost and not t.user_attrs.get(SURPLUS_ATTR)]


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials that count towards `trials`."""
    return [t for t in places(trials) if t.state.is_finished()]


def next_trial(study: optuna.Study, target: int) -> optuna.Trial | None:
    """A trial to run (a waiting retry first), or None when all `target` places are finished or running."""
    taken = places(study.get_trials(deepcopy=False))
    if len(taken) >= target and not any(t.state == TrialState.WAITING for t in taken):
        return None
    trial = study.ask()
    ahead = [t for t in places(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(ahead) < target:
        return trial
    trial.set_user_attr(SURPLUS_ATTR, True)  # another worker took the last place meanwhile
    study.tell(trial, state=TrialState.FAIL)
    return None


def enqueue_retry(study: optuna.Study, lost: FrozenTrial | optuna.Trial, reason: str | None = None) -> None:
    """Queue a retry of a lost trial with its params, unless one is queued already; `reason` says why it was
    lost when the trial itself cannot (its worker is gone)."""
    if any(t.user_attrs.get(RETRY_ATTR) == lost.number for t in study.get_trials(deepcopy=False)):
        return
    attrs = {RETRY_ATTR: lost.number, **({LOST_ATTR: reason} if reason else {})}
    study.enqueue_trial(dict(lost.params), user_attrs=attrs)


def lost_reason(trial: FrozenTrial, retry: FrozenTrial) -> str:
    """Why a lost trial was lost, and which trial retries it."""
    reason = trial.user_attrs.get(ERROR_ATTR) or retry.user_attrs.get(LOST_ATTR) or "its worker died"
    return f"{reason}; retried as trial {retry.number}"


def reported_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial that ran: all but the surplus ones, failed before they started."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]


def trial_error(trial: FrozenTrial) -> str | None:
    """The error a failed trial recorded in Optuna."""
    return trial.user_attrs.get(ERROR_ATTR)
