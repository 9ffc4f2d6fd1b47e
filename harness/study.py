"""`harness sweep`: an Optuna study from a study file, a parent MLflow run per study and a child run per
trial. Every Optuna call of the project lives here.

Counting. A study is done when it holds `trials` counted trials: COMPLETE, PRUNED, or FAIL by the trial
itself (an error, a diverging loss). A trial lost to its worker (killed, or interrupted by Ctrl-C) is FAIL
too, but a retry with the same params is enqueued carrying user attr `retry_of` = the lost trial's number;
the lost trial then no longer counts, its retry does.

Recovery. Only the coordinator (the `harness sweep` process) fails lost trials, so no two processes of a
host retry the same trial: RUNNING trials whose worker process is gone from this host, whose heartbeat is
stale (any host sharing an RDB storage), or that named no worker within the grace period.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
import psutil
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from harness import tracking
from harness.config import ConfigError, TrainConfig, build_train_config, set_dotted
from harness.study_config import (
    CategoricalSpace,
    CmaesSampler,
    FloatSpace,
    GpSampler,
    GridSampler,
    HyperbandPruner,
    IntSpace,
    MedianPruner,
    NoPruner,
    Nsga2Sampler,
    RandomSampler,
    Space,
    StudySpec,
    SuccessiveHalvingPruner,
    TpeSampler,
)
from harness.train import Evaluation, RunInfo, TrainListener, train

# Optuna trial user attrs
RUN_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # {"host", "pid", "started"}: the process running the trial
RETRY_ATTR = "retry_of"  # on a retry: the number of the lost trial it replaces
ERROR_ATTR = "error"
SURPLUS_ATTR = "surplus"  # asked in a race for the last place: failed before training, never counted
# Optuna study user attrs
PARENT_ATTR = "mlflow_parent_run_id"
SPEC_ATTR = "harness.spec"  # StudySpec.fingerprint() of the study's first run

EXIT_INTERRUPTED = 130
SQLITE_BUSY_TIMEOUT_S = 60
IDLE_POLL_S = 2.0  # a worker with nothing to start waits for running trials this long between looks
RECOVER_EVERY_S = 10.0
READ_TRIALS_EVERY_S = 2.0
WORKER_STOP_TIMEOUT_S = 60
SHOWN_METRICS = ("loss/d", "loss/g")  # besides the objectives, in the live display
PROGRESS_PREFIX = "progress-"  # <status dir>/progress-<pid>.json: a worker's running trial
SAMPLERS: dict[type, type[optuna.samplers.BaseSampler]] = {
    TpeSampler: optuna.samplers.TPESampler,
    RandomSampler: optuna.samplers.RandomSampler,
    CmaesSampler: optuna.samplers.CmaEsSampler,
    GpSampler: optuna.samplers.GPSampler,
    Nsga2Sampler: optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[type, type[optuna.pruners.BasePruner]] = {
    MedianPruner: optuna.pruners.MedianPruner,
    HyperbandPruner: optuna.pruners.HyperbandPruner,
    SuccessiveHalvingPruner: optuna.pruners.SuccessiveHalvingPruner,
    NoPruner: optuna.pruners.NopPruner,
}


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial records that it is alive, and after how much silence it is lost."""

    interval_s: int = 10
    grace_s: int = 60


@dataclass(frozen=True)
class Sweep:
    """What running trials takes: the spec, the study and its storage, the MLflow client and parent run."""

    spec: StudySpec
    study: optuna.Study
    storage: RDBStorage
    client: MlflowClient
    parent_run_id: str
    heartbeat: Heartbeat


class StudyEndsGrid(optuna.samplers.GridSampler):
    """A GridSampler that leaves ending the study to `trials`: its own `study.stop()` works only inside
    `Study.optimize`, and this module asks and tells."""

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        return None


def quiet_optuna() -> None:
    """Keep Optuna's log lines and its notes on experimental and heartbeat features off the display."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# --- storage, study, sampler, pruner ---


def display_url(url: str) -> str:
    """A storage URL without its password, fit for tags and messages."""
    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat: Heartbeat = Heartbeat()) -> RDBStorage:
    """The RDB storage at `url` with heartbeats; SQLite waits for locks rather than failing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat.interval_s,
            grace_period=heartbeat.grace_s,
            heartbeat_stale_trial_callback=enqueue_retry,
        )
    except (ImportError, SQLAlchemyError) as err:
        raise ConfigError("storage", display_url(url), f"cannot open: {str(err).splitlines()[0]}") from None


def make_sampler(spec: StudySpec, offset: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler; a seed moves by `offset` so that a resumed or parallel worker draws anew."""
    options = spec.sampler.model_dump(exclude={"type"})
    if isinstance(spec.sampler, GridSampler):  # every worker must shuffle the grid alike
        return StudyEndsGrid({key: list(space.grid() or ()) for key, space in spec.search.items()}, **options)
    if options["seed"] is not None:
        options["seed"] += offset
    return SAMPLERS[type(spec.sampler)](**options)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; without one, median for a single objective and none for several."""
    pruner = spec.pruner or (NoPruner(type="none") if spec.multi_objective else MedianPruner(type="median"))
    return PRUNERS[type(pruner)](**pruner.model_dump(exclude={"type"}))


def open_study(spec: StudySpec, storage: RDBStorage, source: str, create: bool) -> optuna.Study:
    """The spec's study, created if new and `create`. A stored study whose objectives, base config or search
    space differ from the spec's is a ConfigError: resuming it would mix two experiments."""
    fingerprint = json.loads(json.dumps(spec.fingerprint()))
    if spec.name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=spec.name, storage=storage, pruner=make_pruner(spec))
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is not None and stored != fingerprint:
            key = next(k for k in fingerprint if stored.get(k) != fingerprint[k])
            where = f"the study '{spec.name}' in {display_url(spec.storage_url)}"
            raise ConfigError(source, key, f"differs from {where}; give the changed study a new name")
    elif create:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            pruner=make_pruner(spec),
            directions=[objective.direction for objective in spec.objective_list],
            load_if_exists=True,
        )
    else:
        raise ConfigError(source, "name", f"no study '{spec.name}' in {display_url(spec.storage_url)}")
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, fingerprint)
        if spec.multi_objective:
            study.set_metric_names([objective.metric for objective in spec.objective_list])
    return study


# --- counting ---


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


# --- recovery ---


def enqueue_retry(study: optuna.Study, lost: FrozenTrial | optuna.Trial) -> None:
    """Queue a retry of a lost trial with its params, unless one is queued already."""
    if any(t.user_attrs.get(RETRY_ATTR) == lost.number for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(dict(lost.params), user_attrs={RETRY_ATTR: lost.number})


def worker_identity() -> dict[str, Any]:
    """This process, recognisably even after its pid is reused: host, pid and start time."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def worker_gone(trial: FrozenTrial, grace_s: int) -> bool:
    """True when a RUNNING trial's worker process is gone from this host, or when the trial named no
    worker within the grace period (its worker died right after asking). Other hosts' trials are left to
    their heartbeats."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > grace_s
    if worker["host"] != socket.gethostname():
        return False
    try:
        process = psutil.Process(worker["pid"])
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - worker["started"]) > 1
    except psutil.NoSuchProcess:
        return True


def recover(sweep: Sweep) -> None:
    """Fail and retry the lost trials, then close the trial runs their workers left RUNNING."""
    with sigint_deferred():
        optuna.storages.fail_stale_trials(sweep.study)  # stale heartbeats; the storage's callback retries them
        for trial in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not worker_gone(trial, sweep.heartbeat.grace_s):
                continue
            try:
                sweep.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, UpdateFinishedTrialError):
                continue  # it ended meanwhile
            enqueue_retry(sweep.study, trial)
        close_orphan_runs(sweep)


def close_orphan_runs(sweep: Sweep) -> None:
    """Close each trial run left RUNNING by a trial that has ended; a lost trial's run ends KILLED."""
    runs = tracking.running_trial_runs(sweep.client, sweep.spec.name)
    if not runs:
        return
    trials = {t.number: t for t in sweep.study.get_trials(deepcopy=False)}
    retries = {t.user_attrs[RETRY_ATTR]: t.number for t in trials.values() if RETRY_ATTR in t.user_attrs}
    for number, run_id in runs.items():
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue
        if number in retries:
            error = f"{trial.user_attrs.get(ERROR_ATTR) or 'its worker died'}; retried as trial {retries[number]}"
            tracking.finish_trial_run(sweep.client, run_id, "LOST", error)
        else:
            tracking.finish_trial_run(sweep.client, run_id, trial.state.name, trial.user_attrs.get(ERROR_ATTR))


# --- one trial ---


def suggest(trial: optuna.Trial, key: str, space: Space) -> Any:
    """The trial's value for a search key, as the train config takes it."""
    if isinstance(space, FloatSpace):
        return trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, IntSpace):
        return trial.suggest_int(key, space.low, space.high, log=space.log, step=space.step)
    return space.decode(trial.suggest_categorical(key, space.optuna_choices()))


def trial_config(spec: StudySpec, trial: optuna.Trial) -> TrainConfig:
    """The base config with the trial's value for every search key."""
    tree = spec.train.model_dump()
    for key, space in spec.search.items():
        set_dotted(tree, key, suggest(trial, key, space), "search")
    return build_train_config(tree, f"trial {trial.number}")


class ObjectiveReporter(TrainListener):
    """Keeps the objective metrics' last values; at each evaluation after training began reports the
    (single) objective to Optuna, its step counting those evaluations, and stops a trial the pruner prunes."""

    def __init__(self, trial: optuna.Trial, metrics: Sequence[str], report: bool) -> None:
        self.trial, self.metrics, self.report = trial, tuple(metrics), report
        self.latest: dict[str, float] = {}
        self.evaluations = 0

    def on_log(self, step: int, values: dict[str, float]) -> None:
        self.latest.update(values)

    def on_eval(self, evaluation: Evaluation) -> None:
        self.latest.update(evaluation.metrics)
        if evaluation.step == 0:
            return  # the untrained baseline, alike for all trials of a seed: nothing to prune on
        self.evaluations += 1
        value = self.latest.get(self.metrics[0])
        if not self.report or value is None:
            return
        self.trial.report(value, self.evaluations)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {self.evaluations} (step {evaluation.step})")

    def values(self) -> list[float]:
        """The objectives' last values; ValueError when one is missing or not finite."""
        values = []
        for metric in self.metrics:
            value = self.latest.get(metric)
            if value is None or not math.isfinite(value):
                raise ValueError(f"objective {metric} is {'never logged' if value is None else value}")
            values.append(value)
        return values


class TrialProgress(TrainListener):
    """Writes the running trial's step and last metrics to a JSON file the live display reads, then
    calls `tick` (the in-process display's chance to redraw)."""

    def __init__(self, path: Path, number: int, shown: Sequence[str], tick: Callable[[], None]) -> None:
        self.path, self.shown, self.tick = path, tuple(shown), tick
        self.state: dict[str, Any] = {"trial": number, "step": 0, "steps": None, "metrics": {}}

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None:
        self.state["steps"] = cfg.steps
        self.write()

    def on_log(self, step: int, values: dict[str, float]) -> None:
        self.state["step"] = step
        self.state["metrics"].update({k: v for k, v in values.items() if k in self.shown})
        self.write()

    def on_eval(self, evaluation: Evaluation) -> None:
        self.state["metrics"].update({k: v for k, v in evaluation.metrics.items() if k in self.shown})
        self.write()

    def write(self) -> None:
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps(self.state), encoding="utf-8")
        partial.replace(self.path)
        self.tick()


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C during bookkeeping takes effect when the block is done, not halfway through a store."""
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed and callable(previous):
            previous(signal.SIGINT, None)  # Python's handler raises KeyboardInterrupt; an outer deferral waits


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """No more Ctrl-C while the command winds up: it is on its way out already."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def heartbeat(storage: RDBStorage, study: optuna.Study, number: int, interval_s: int) -> Iterator[None]:
    """Record the trial's heartbeat in the storage every `interval_s` until the block ends."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(SQLAlchemyError):  # a busy database: the next beat, well within the grace
                storage.record_heartbeat(trial_id)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def free_memory() -> None:
    """Release what a finished (or failed, e.g. out-of-memory) trial held, on the GPU too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trial(sweep: Sweep, trial: optuna.Trial, listeners: Sequence[TrainListener]) -> None:
    """Train one claimed trial and record its end in both stores. Errors fail the trial and are not
    raised; Ctrl-C marks it interrupted, queues its retry, and is raised."""
    spec, client = sweep.spec, sweep.client
    metrics = [objective.metric for objective in spec.objective_list]
    run_id: str | None = None
    state, values, error = "COMPLETE", None, None
    try:
        with heartbeat(sweep.storage, sweep.study, trial.number, sweep.heartbeat.interval_s):
            retry_of = trial.user_attrs.get(RETRY_ATTR)
            tags = {"harness.retry_of": str(retry_of)} if retry_of is not None else {}
            run_id = tracking.start_trial_run(client, spec.name, sweep.parent_run_id, trial.number, tags)
            trial.set_user_attr(RUN_ATTR, run_id)
            reporter = ObjectiveReporter(trial, metrics, report=not spec.multi_objective)
            train(trial_config(spec, trial), [tracking.RunLogger(client, run_id), reporter, *listeners])
            values = reporter.values()
    except optuna.TrialPruned:
        state = "PRUNED"
    except KeyboardInterrupt:
        interrupt_trial(sweep, trial, run_id)
        raise
    except Exception as err:  # any error fails this trial only (out of memory too): the sweep goes on
        state, error = "FAIL", f"{type(err).__name__}: {err}"
    with sigint_deferred():
        end_trial(sweep, trial, run_id, state, values, error)
    free_memory()


def interrupt_trial(sweep: Sweep, trial: optuna.Trial, run_id: str | None) -> None:
    """Ctrl-C: the trial fails as interrupted in both stores, and a retry is queued for the next start."""
    with sigint_deferred():
        enqueue_retry(sweep.study, trial)
        end_trial(sweep, trial, run_id, "INTERRUPTED", error="interrupted")


def end_trial(
    sweep: Sweep,
    trial: optuna.Trial,
    run_id: str | None,
    state: str,
    values: list[float] | None = None,
    error: str | None = None,
) -> None:
    """Tell Optuna how the trial ended (INTERRUPTED is FAIL there), then close its run the same way. A
    trial failed meanwhile as lost (its heartbeat went stale) keeps that end: its retry runs it again."""
    running = sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if any(t.number == trial.number for t in running):
        if error:
            trial.set_user_attr(ERROR_ATTR, error[:5000])
        sweep.study.tell(trial, values, state=TrialState.FAIL if state == "INTERRUPTED" else TrialState[state])
    else:
        state, error = "LOST", "failed as lost meanwhile (its heartbeat went stale); retried"
    if run_id is not None:
        tracking.finish_trial_run(sweep.client, run_id, state, error)


# --- workers ---


def work_loop(
    sweep: Sweep,
    deadline: float | None,
    listeners: Callable[[int], Sequence[TrainListener]],
    between: Callable[[], None],
) -> None:
    """Run trials until the study's places are all taken and none is running, or the deadline passes
    (a running trial always finishes). `between` runs before each trial and while waiting."""
    while deadline is None or time.monotonic() < deadline:
        between()
        trial = None
        try:
            with sigint_deferred():  # an asked trial that names no worker would look alive for the grace period
                trial = next_trial(sweep.study, sweep.spec.trials)
                if trial is not None:
                    trial.set_user_attr(WORKER_ATTR, worker_identity())
        except KeyboardInterrupt:
            if trial is not None:
                interrupt_trial(sweep, trial, None)
            raise
        if trial is not None:
            run_trial(sweep, trial, listeners(trial.number))
            continue
        if not sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(IDLE_POLL_S)


def progress_listeners(
    spec: StudySpec, status_dir: Path, tick: Callable[[], None]
) -> Callable[[int], list[TrainListener]]:
    """A trial's display listeners, by trial number: its progress file, then `tick`."""
    shown = [*(objective.metric for objective in spec.objective_list), *SHOWN_METRICS]
    path = status_dir / f"{PROGRESS_PREFIX}{os.getpid()}.json"
    return lambda number: [TrialProgress(path, number, shown, tick)]


def exit_with_parent(parent_pid: int) -> None:
    """A worker dies with its coordinator, as if killed with it (its trial is then recovered as lost)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(spec_file: Path, worker: int, status_dir: Path, parent_pid: int) -> int:
    """One worker process of `harness sweep --workers N`, on the coordinator's spec (JSON): trials until
    the study is done; 130 on Ctrl-C."""
    exit_with_parent(parent_pid)
    quiet_optuna()
    spec, source = StudySpec.model_validate_json(spec_file.read_text(encoding="utf-8")), str(spec_file)
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    heartbeat = Heartbeat()
    storage = open_storage(spec.storage_url, heartbeat)
    study = open_study(spec, storage, source, create=False)
    study.sampler = make_sampler(spec, 7919 * (worker + 1) + len(study.get_trials(deepcopy=False)))
    client = tracking.client_for(spec.tracking_uri)
    sweep = Sweep(spec, study, storage, client, study.user_attrs[PARENT_ATTR], heartbeat)
    try:
        work_loop(sweep, deadline, progress_listeners(spec, status_dir, lambda: None), lambda: None)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES' list, else every one torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def worker_env(worker: int, workers: int, device: str) -> dict[str, str]:
    """The worker's environment: its share of the CPU threads, and with several GPUs one of them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[worker % len(gpus)]
    return env


def spawn_worker(spec_file: Path, worker: int, workers: int, device: str, status_dir: Path) -> subprocess.Popen[bytes]:
    """Start `harness sweep-worker` in its own session (Ctrl-C reaches it through the coordinator)."""
    command = [sys.executable, "-m", "harness.cli", "sweep-worker", str(spec_file), "--worker", str(worker)]
    command += ["--status-dir", str(status_dir), "--parent-pid", str(os.getpid())]
    with (status_dir / f"worker-{worker}.log").open("wb") as log:
        return subprocess.Popen(
            command,
            env=worker_env(worker, workers, device),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def supervise(sweep: Sweep, workers: int, status_dir: Path, monitor: Monitor) -> int:
    """Run `workers` worker processes to the end, recovering the trials of any that dies (the others run
    the retries); 1 when one failed and the study fell short. Ctrl-C is passed on to the workers, which
    mark their trials interrupted."""
    recover(sweep)
    spec_file = status_dir / "study.json"  # the workers' spec: this one, whatever happens to the file
    spec = sweep.spec.model_copy(update={"tracking_uri": sweep.client.tracking_uri})
    spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
    device = spec.train.device
    processes = [spawn_worker(spec_file, i, workers, device, status_dir) for i in range(workers)]
    alive, recovered = len(processes), time.monotonic()
    try:
        while alive:
            time.sleep(0.5)
            monitor.poll()
            now_alive = sum(process.poll() is None for process in processes)
            if now_alive < alive or time.monotonic() - recovered > RECOVER_EVERY_S:
                recover(sweep)
                alive, recovered = now_alive, time.monotonic()
    except KeyboardInterrupt:
        with sigint_ignored():
            stop_workers(processes)
        raise
    failed = [i for i, process in enumerate(processes) if process.returncode != 0]
    for i in failed:
        code = processes[i].returncode
        if code < 0:
            say(monitor.console, f"worker {i} was killed by signal {-code}")
            continue
        log = (status_dir / f"worker-{i}.log").read_text(encoding="utf-8", errors="replace").strip()
        say(monitor.console, f"worker {i} exited with code {code}: {log.splitlines()[-1] if log else 'no output'}")
    short = len(counted(sweep.study.get_trials(deepcopy=False))) < sweep.spec.trials
    return 1 if failed and short else 0


def stop_workers(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Interrupt the running workers and wait for their bookkeeping; kill any that hangs."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the live display ---


class Monitor:
    """The live display: trials finished of the total, the best value so far, and each running trial's
    step and last metrics; a line for each trial as it ends."""

    def __init__(self, sweep: Sweep, status_dir: Path, console: Console) -> None:
        self.sweep, self.status_dir, self.console = sweep, status_dir, console
        self.trials = sweep.study.get_trials(deepcopy=False)
        self.announced = {t.number for t in self.trials if t.state.is_finished()}
        self.read_at = time.monotonic()
        self.started = time.monotonic()
        self.live = Live(console=console, auto_refresh=False, transient=True)  # the summary lines stay

    def __enter__(self) -> Monitor:
        done = counted(self.trials)
        if done:
            say(self.console, f"resuming study {self.sweep.spec.name}: {len(done)}/{self.sweep.spec.trials} finished")
        self.live.start()
        self.live.update(self.render(), refresh=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.poll(force=True)
        self.live.stop()

    def poll(self, force: bool = False) -> None:
        """Re-read the study now and then, announce the trials that ended, redraw."""
        if force or time.monotonic() - self.read_at >= READ_TRIALS_EVERY_S:
            self.trials = self.sweep.study.get_trials(deepcopy=False)
            self.read_at = time.monotonic()
            for trial in self.trials:
                if trial.state.is_finished() and trial.number not in self.announced:
                    self.announced.add(trial.number)
                    line = self.describe(trial)
                    if line:
                        say(self.console, line)
        self.live.update(self.render(), refresh=True)

    def describe(self, trial: FrozenTrial) -> str | None:
        """One line on how a trial ended; None for a surplus trial, which never ran."""
        if trial.user_attrs.get(SURPLUS_ATTR):
            return None
        retries = {t.user_attrs[RETRY_ATTR]: t.number for t in self.trials if RETRY_ATTR in t.user_attrs}
        params = "  ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        if trial.number in retries:
            reason = trial.user_attrs.get(ERROR_ATTR) or "its worker died"
            return f"trial {trial.number} LOST ({reason}), retried as trial {retries[trial.number]}"
        if trial.state == TrialState.COMPLETE:
            values = "  ".join(f"{m}={v:.4f}" for m, v in zip(self.metrics, trial.values or (), strict=False))
            return f"trial {trial.number} COMPLETE  {values}  {params}"
        if trial.state == TrialState.PRUNED:
            return f"trial {trial.number} PRUNED at evaluation {trial.last_step}  {params}"
        return f"trial {trial.number} FAIL  {trial.user_attrs.get(ERROR_ATTR, '')}  {params}"

    @property
    def metrics(self) -> list[str]:
        """The objectives' metric names."""
        return [objective.metric for objective in self.sweep.spec.objective_list]

    def running(self) -> list[dict[str, Any]]:
        """The progress of each running trial with a worker on this machine."""
        states = []
        for path in sorted(self.status_dir.glob(f"{PROGRESS_PREFIX}*.json")):
            try:
                states.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # replaced or removed while reading
        live = {t.number for t in self.trials if t.state == TrialState.RUNNING}
        return [state for state in states if state["trial"] in live]

    def render(self) -> RenderableType:
        """A line with finished of total and the best so far, then a row per running trial."""
        spec = self.sweep.spec
        done = counted(self.trials)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.started))
        title = Text(f"study {spec.name}: {len(done)}/{spec.trials} finished, {best_text(spec, self.trials)} {elapsed}")
        running = self.running()
        if not running:
            return title
        shown = [*self.metrics, *SHOWN_METRICS]
        table = Table()
        for column in ("trial", "step", *shown):
            table.add_column(column, justify="right")
        for state in running:
            step = f"{state['step']}/{state['steps']}" if state["steps"] else "starting"
            values = [format_value(state["metrics"][m]) if m in state["metrics"] else "-" for m in shown]
            table.add_row(str(state["trial"]), step, *values)
        return Group(title, table)


def say(console: Console, line: str) -> None:
    """Print a line as is: no markup, no colouring, no wrapping."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def format_value(value: Any) -> str:
    """Floats to 4 significant digits, the rest as they print."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_text(spec: StudySpec, trials: Sequence[FrozenTrial]) -> str:
    """The best value so far, from trials already read (a redraw queries nothing)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not complete:
        return "no trial complete yet"
    if spec.multi_objective:
        return f"{len(complete)} complete"
    sign = 1.0 if spec.objective_list[0].direction == "maximize" else -1.0
    best = max(complete, key=lambda t: sign * (t.values or [0.0])[0])
    return f"best {spec.objective_list[0].metric} {format_value(best.value)} (trial {best.number})"


# --- the parent run ---


def describe_space(space: Space) -> str:
    """`float [0.1, 4.0] log`, `int [0, 8] step 2`, `categorical [...]`."""
    if isinstance(space, CategoricalSpace):
        return f"categorical {list(space.optuna_choices())}"
    text = f"{space.type} [{space.low}, {space.high}]" + (" log" if space.log else "")
    step = space.step if isinstance(space, FloatSpace) or space.step != 1 else None
    return text + (f" step {step}" if step is not None else "")


def study_params(spec: StudySpec) -> dict[str, Any]:
    """The parent run's params: base config, search space and objectives."""
    params: dict[str, Any] = {f"train.{k}": v for k, v in tracking.config_params(spec.train).items()}
    params |= {f"search.{key}": describe_space(space) for key, space in spec.search.items()}
    params |= {f"objective.{o.metric}": o.direction for o in spec.objective_list}
    return params


def study_tags(spec: StudySpec) -> dict[str, str]:
    """The parent run's tags: storage, sampler and pruner (`TPESampler {"seed": 0, ...}`), trials."""
    sampler, pruner = make_sampler(spec, 0), make_pruner(spec)
    sampler_options = spec.sampler.model_dump(exclude={"type"})
    pruner_options = spec.pruner.model_dump(exclude={"type"}) if spec.pruner else {}
    return {
        "optuna.storage": display_url(spec.storage_url),
        "optuna.sampler": f"{type(sampler).__name__} {json.dumps(sampler_options)}",
        "optuna.pruner": f"{type(pruner).__name__} {json.dumps(pruner_options)}",
        "harness.trials": str(spec.trials),
    }


def summary(sweep: Sweep) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """The parent run's closing metrics, tags and text files: best value and params, the trials table."""
    study, spec = sweep.study, sweep.spec
    trials = study.get_trials(deepcopy=False)
    done = counted(trials)
    metrics = {
        f"trials/{state.name.lower()}": float(sum(t.state == state for t in done))
        for state in TrialState
        if state.is_finished()
    }
    tags: dict[str, str] = {}
    frame = study.trials_dataframe(
        attrs=("number", "value", "state", "datetime_start", "duration", "params", "user_attrs")
    )
    texts = {"trials.csv": frame.to_csv(index=False)}
    if any(t.state == TrialState.COMPLETE for t in trials):
        if spec.multi_objective:
            front = [
                {"trial": t.number, "values": t.values, "params": t.params, RUN_ATTR: t.user_attrs.get(RUN_ATTR)}
                for t in study.best_trials
            ]
            texts["pareto_front.json"] = json.dumps(front, indent=2)
            tags["best.trials"] = ",".join(str(t.number) for t in study.best_trials)
        else:
            best = study.best_trial
            assert best.value is not None
            metrics[f"best/{spec.objective_list[0].metric}"] = best.value
            tags |= {"best.trial": str(best.number), "best.run_id": str(best.user_attrs.get(RUN_ATTR))}
            tags |= {f"best.{key}": str(value) for key, value in best.params.items()}
    return metrics, tags, texts


PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")  # optuna's plot_<name>


def plot_jobs(metrics: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(file stem, Optuna plot name, its keyword arguments) of each plot of a study with these
    objectives: one of each plot per objective for several, plus the Pareto front for 2 or 3."""
    if len(metrics) == 1:
        return [(plot, plot, {"target_name": metrics[0]}) for plot in PLOTS]
    jobs = [
        (f"{plot}_{re.sub(r'[^A-Za-z0-9.-]+', '_', metric)}", plot, {"target": objective_value(i), "target_name": metric})
        for plot in PLOTS
        for i, metric in enumerate(metrics)
    ]
    if len(metrics) <= 3:
        jobs.append(("pareto_front", "pareto_front", {"target_names": list(metrics)}))
    return jobs


def study_figures(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """Optuna's plots as matplotlib figures, by artifact file; plots a study cannot draw yet are left out."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return {}
    jobs = plot_jobs([objective.metric for objective in spec.objective_list])
    if not spec.multi_objective and any(t.intermediate_values for t in trials):
        jobs.append(("intermediate_values", "intermediate_values", {}))
    figures = {}
    for stem, plot, kwargs in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # notes on studies too small to plot well
                axes = getattr(plots, f"plot_{plot}")(study, **kwargs)
        except (ValueError, RuntimeError):
            continue  # e.g. importances need two complete trials that differ
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figures[f"plots/{stem}.png"] = first.figure
    return figures


def objective_value(index: int) -> Callable[[FrozenTrial], float]:
    """A plot target: one objective of a multi-objective trial."""
    return lambda trial: (trial.values or [])[index]


def close_study_run(sweep: Sweep, status: str) -> None:
    """Summarise the study in its parent run and close it with `status`."""
    import matplotlib.pyplot as plt

    metrics, tags, texts = summary(sweep)
    figures = study_figures(sweep.study, sweep.spec)
    step = len(counted(sweep.study.get_trials(deepcopy=False)))
    try:
        tracking.finish_study_run(sweep.client, sweep.parent_run_id, status, step, metrics, tags, texts, figures)
    finally:
        for figure in figures.values():
            plt.close(figure)


# --- the coordinator ---


def run_sweep(spec: StudySpec, study_file: Path, workers: int, console: Console) -> int:
    """Run or resume the study to `trials` counted trials, in-process or with `workers` processes.
    Returns the exit code: 0, 1 when a worker process failed, 130 on Ctrl-C."""
    quiet_optuna()
    heartbeat = Heartbeat()
    storage = open_storage(spec.storage_url, heartbeat)
    study = open_study(spec, storage, str(study_file), create=True)
    study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
    client = tracking.client_for(spec.tracking_uri)
    parent = tracking.open_study_run(
        client, spec.name, study.user_attrs.get(PARENT_ATTR), study_params(spec), study_tags(spec)
    )
    study.set_user_attr(PARENT_ATTR, parent)
    sweep = Sweep(spec, study, storage, client, parent, heartbeat)
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    status, code = RunStatus.to_string(RunStatus.FINISHED), 0
    with tempfile.TemporaryDirectory(prefix="harness-sweep-") as folder:
        status_dir = Path(folder)
        try:
            with Monitor(sweep, status_dir, console) as monitor:
                if workers == 1:

                    def between() -> None:
                        recover(sweep)
                        monitor.poll()

                    work_loop(sweep, deadline, progress_listeners(spec, status_dir, monitor.poll), between)
                else:
                    code = supervise(sweep, min(workers, spec.trials), status_dir, monitor)
        except KeyboardInterrupt:
            status, code = RunStatus.to_string(RunStatus.KILLED), EXIT_INTERRUPTED
        except BaseException as err:
            with sigint_ignored():
                recover(sweep)
                tracking.end_run(
                    client, parent, RunStatus.to_string(RunStatus.FAILED), {"error": f"{type(err).__name__}: {err}"}
                )
            raise
    with sigint_ignored():
        recover(sweep)
        close_study_run(sweep, status)
    print_summary(sweep, console, code)
    return code


def print_summary(sweep: Sweep, console: Console, code: int) -> None:
    """The closing lines: trial counts, the best trial, where both stores are."""
    spec, study = sweep.spec, sweep.study
    trials = study.get_trials(deepcopy=False)
    done = counted(trials)
    by_state = ", ".join(
        f"{sum(t.state == s for t in done)} {s.name.lower()}"
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    )
    say(console, f"study {spec.name}: {len(done)}/{spec.trials} trials finished ({by_state})")
    if code == EXIT_INTERRUPTED:
        say(console, "interrupted: run the same command again to resume")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete and not spec.multi_objective:
        best = study.best_trial
        params = "  ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        say(console, f"best trial {best.number}: {spec.objective_list[0].metric}={best.value:.4f}  {params}")
    elif complete:
        say(console, f"Pareto front: trials {', '.join(str(t.number) for t in study.best_trials)}")
    say(console, f"MLflow: experiment {spec.name}, parent run {sweep.parent_run_id} in {sweep.client.tracking_uri}")
    say(console, f"Optuna: study {spec.name} in {display_url(spec.storage_url)}")


# --- reading studies (report) ---


def load_existing_study(storage: str, name: str, storage_source: str, name_source: str) -> optuna.Study:
    """A study that exists, creating nothing; a missing storage file or study is a ConfigError naming
    where the storage URL or the name came from (the study file or a flag)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        key = "" if storage_source.startswith("--") else "storage"
        raise ConfigError(storage_source, key, f"no Optuna storage at {display_url(storage)}")
    quiet_optuna()
    rdb = open_storage(storage)
    names = optuna.study.get_all_study_names(rdb)
    if name not in names:
        held = ", ".join(sorted(names)) or "none"
        key = "" if name_source.startswith("--") else "name"
        raise ConfigError(name_source, key, f"no study '{name}' in {display_url(storage)} (it holds: {held})")
    return optuna.load_study(study_name=name, storage=rdb)


def reported_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial that ran: all but the surplus ones, failed before they started."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]


def trial_error(trial: FrozenTrial) -> str | None:
    """The error a failed trial recorded in Optuna."""
    return trial.user_attrs.get(ERROR_ATTR)
