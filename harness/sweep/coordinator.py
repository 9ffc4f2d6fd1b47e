"""`harness sweep`: run or resume a study to `trials` counted trials, in-process or with worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

from mlflow.entities import RunStatus
from optuna.trial import TrialState
from rich.console import Console

from harness import signals, tracking
from harness.data import DataFallbackWarning, DataUnavailableError, locate, settle
from harness.errors import ConfigError
from harness.sweep.bookkeeping import (
    PARENT_ATTR,
    counted,
)
from harness.sweep.display import Monitor, progress_watchers, say
from harness.sweep.lock import study_lock
from harness.sweep.outage import StorageUnavailable
from harness.sweep.recovery import recover
from harness.sweep.spec import (
    StudySpec,
)
from harness.sweep.storage import open_storage, quiet_optuna
from harness.sweep.study import Sweep, make_sampler, open_study
from harness.sweep.summary import close_study_run, study_params, study_tags
from harness.sweep.workers import supervise, work_loop
from harness.text import format_value
from harness.urls import display_url


def run_sweep(spec: StudySpec, study_file: Path, workers: int, console: Console) -> int:
    """Run or resume the study to `trials` counted trials, in-process or with `workers` processes.
    Returns the exit code: 0, 1 when a worker process failed or the storage stayed out of reach, 128 + the
    signal's number when stopped (130: Ctrl-C, 143: SIGTERM)."""
    quiet_optuna()
    sweep = open_sweep(spec, str(study_file))
    spec = settle_data(spec, str(study_file), console)
    sweep = dataclasses.replace(sweep, spec=spec)
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    status, code = RunStatus.FINISHED, 0
    with tempfile.TemporaryDirectory(prefix="harness-sweep-") as folder:
        status_dir = Path(folder)
        try:
            with Monitor(sweep, status_dir, console) as monitor:
                if workers == 1:

                    def between() -> None:
                        recover(sweep)
                        monitor.poll()

                    work_loop(sweep, deadline, progress_watchers(spec, status_dir, monitor.poll), between)
                else:
                    code = supervise(sweep, min(workers, spec.trials), status_dir, monitor)
        except StorageUnavailable as err:  # nothing more can be recorded: the next start recovers what ran
            say(console, f"error: {err}")
            return 1
        except KeyboardInterrupt as err:
            status, code = RunStatus.KILLED, signals.exit_code(err)
        except BaseException as err:
            with signals.ignored(), contextlib.suppress(Exception):  # the error that ended the sweep is raised
                wind_up(sweep, RunStatus.FAILED, f"{type(err).__name__}: {err}")
            raise
    with signals.ignored():
        wind_up(sweep, status)
    print_summary(sweep, console, interrupted=status == RunStatus.KILLED)
    return code


def open_sweep(spec: StudySpec, source: str) -> Sweep:
    """Open or create the study and its parent run, under the study's lock: two hosts starting a new study
    make one study with one parent run."""
    storage = open_storage(spec.storage_url, spec.heartbeat)
    with study_lock(storage, spec.storage_url, spec.name):
        study = open_study(spec, storage, source, create=True)
        client = tracking.client_for(spec.tracking_uri)
        parent = tracking.open_study_run(
            client, spec.name, study.user_attrs.get(PARENT_ATTR), study_params(spec), study_tags(spec)
        )
        study.set_user_attr(PARENT_ATTR, parent)
    study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
    return Sweep(spec, study, storage, client, parent, spec.heartbeat)


def settle_data(spec: StudySpec, source: str, console: Console) -> StudySpec:
    """Decide once which data the trials use (download now if asked and missing), say it once, and give the
    trials a config that does not ask the network again; every run still records its data as tags."""
    data = settle(spec.train.data)
    try:
        folder, kind = locate(data)
    except DataUnavailableError as err:
        raise ConfigError(source, "train.data", str(err)) from None
    fallback = "" if kind == "torchvision" else f" ({spec.train.data.dataset} is neither on disk nor downloadable)"
    say(console, f"data: {kind} from {folder}{fallback}")
    warnings.filterwarnings("ignore", category=DataFallbackWarning)  # said once, above
    return spec.model_copy(update={"train": spec.train.model_copy(update={"data": data})})


def wind_up(sweep: Sweep, status: int, error: str | None = None) -> None:
    """Recover what workers lost, then close the parent run with the study's summary: once, by the worker
    that ends last. While a trial runs, its worker (of this host or another) closes it; a summary of as many
    counted trials as now is not written twice. Under the study's lock."""
    with sweep.lock():
        recover(sweep)
        trials = sweep.study.get_trials(deepcopy=False)
        if any(trial.state == TrialState.RUNNING for trial in trials):
            return
        closed_with = tracking.closed_tag(sweep.client, sweep.parent_run_id, tracking.CLOSED_TAG)
        if closed_with == str(len(counted(trials))):
            return
        close_study_run(sweep, RunStatus.to_string(status), error)


def print_summary(sweep: Sweep, console: Console, interrupted: bool) -> None:
    """The closing lines: trial counts, the best trial, where both stores are."""
    spec, study = sweep.spec, sweep.study
    trials = study.get_trials(deepcopy=False)
    done = counted(trials)
    by_state = ", ".join(
        f"{sum(t.state == s for t in done)} {s.name.lower()}"
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    )
    say(console, f"study {spec.name}: {len(done)}/{spec.trials} trials finished ({by_state})")
    if interrupted:
        say(console, "interrupted: run the same command again to resume")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and not spec.multi_objective:
        best = study.best_trial
        params = "  ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        say(console, f"best trial {best.number}: {spec.objective_list[0].metric}={format_value(best.value)}  {params}")
    elif complete:
        say(console, f"Pareto front: trials {', '.join(str(t.number) for t in study.best_trials)}")
    say(console, f"MLflow: experiment {spec.name}, parent run {sweep.parent_run_id} in {sweep.client.tracking_uri}")
    say(console, f"Optuna: study {spec.name} in {display_url(spec.storage_url)}")
