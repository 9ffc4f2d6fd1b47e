"""The sweep engine under load, training left out: worker processes run a study of very short trials on
PostgreSQL (Optuna's storage and MLflow's store, each its own database) as `harness sweep --workers N` runs
them, every trial trained by `stub_trainer` instead of `train_pack`. Everything else is the engine's own: the
study lock, claiming places, heartbeats, the pruner's reports, the MLflow runs and their loggers, the
bookkeeping of each trial's end, the coordinator's recovery and its closing of the parent run.

Shared by tests/test_stress.py (which asserts no trial is lost or run twice) and benchmarks/engine_load.py
(which records the wall time). Meanwhile each database's connections are counted every 0.2 s."""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import RunStatus
from mlflow.environment_variables import MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW, MLFLOW_SQLALCHEMYSTORE_POOL_SIZE
from optuna.trial import TrialState
from sqlalchemy import QueuePool
from sqlalchemy.engine import make_url

from harness import tracking
from harness.evaluate import Evaluation
from harness.sweep.coordinator import open_sweep, wind_up
from harness.sweep.recovery import recover
from harness.sweep.spec import StudySpec, load_study_spec
from harness.sweep.storage import SERVER_ENGINE_KWARGS, quiet_optuna
from harness.sweep.study import Sweep
from harness.sweep.workers import RECOVER_EVERY_S, run_worker
from harness.train import Group, GroupOutcome, RunInfo, TrainResult
from tests.worker_logs import log_tail

STUDY = "load"
OBJECTIVE = "eval/cat_acc"
# A stub trial: the baseline evaluation, then two log windows and two evaluations, as a tiny real trial has.
TRAIN = {"data": {"download": False}, "optim": {"batch_size": 16}, "steps": 4, "eval_every": 2, "log_every": 2}
SEARCH = {"loss.lambda_cat": {"type": "float", "low": 0.5, "high": 2.0, "log": True}}
ROUND_SLEEP_S = 0.005  # each stub round "trains" this long: the engine's own cost is what is measured
SAMPLE_EVERY_S = 0.2
STUB_INFO = RunInfo("stub", "stub", "none (a stub trainer: no data, no model)", 0, 0)


def stub_value(lambda_cat: float, progress: float) -> float:
    """The stub's objective a fraction `progress` through a trial: a function of the trial's config, so that
    each run's metric can be checked."""
    return progress / (1.0 + abs(math.log(lambda_cat)))


def stub_trainer(groups: Sequence[Group]) -> list[GroupOutcome]:
    """A STUB of `train_pack`, replacing training in the engine's stress test only (never in the harness):
    calls each group's listeners as `train_pack` does (start, the step-0 evaluation, each log window and
    evaluation, the objective a function of the config), sleeping a moment a round, and returns the same
    outcomes, so that the sweep's reporters, MLflow loggers, bookkeeping and locks all run."""
    started = time.perf_counter()
    errors: dict[int, Exception] = {}
    last: dict[int, list[dict[str, float]]] = {g: [{} for _ in group.configs] for g, group in enumerate(groups)}

    def each_live(work: Callable[[int, Group], None]) -> None:
        for g, group in enumerate(groups):
            if g not in errors:
                try:
                    work(g, group)
                except Exception as err:  # a pruned trial, any error of its listeners: that group stops
                    errors[g] = err

    def start(g: int, group: Group) -> None:
        for cfg, listeners in zip(group.configs, group.listeners, strict=True):
            for listener in listeners:
                listener.on_start(STUB_INFO, cfg)
        for watcher in group.watchers:
            watcher.on_start(STUB_INFO, group.configs)

    def evaluate(step: int) -> None:
        def work(g: int, group: Group) -> None:
            values = [stub_value(cfg.loss.lambda_cat, step / cfg.steps) for cfg in group.configs]
            evaluations = [Evaluation(step, {OBJECTIVE: value}, {}) for value in values]
            for evaluation, listeners, seen in zip(evaluations, group.listeners, last[g], strict=True):
                seen.update(evaluation.metrics)
                for listener in listeners:
                    listener.on_eval(evaluation)
            for watcher in group.watchers:
                watcher.on_eval_round(step, evaluations)

        time.sleep(ROUND_SLEEP_S)
        each_live(work)

    def log(step: int) -> None:
        def work(g: int, group: Group) -> None:
            values = [{"loss/stub": 1.0 / step} for _ in group.configs]
            for member_values, listeners, seen in zip(values, group.listeners, last[g], strict=True):
                seen.update(member_values)
                for listener in listeners:
                    listener.on_log(step, member_values)
            for watcher in group.watchers:
                watcher.on_log_round(step, values)

        time.sleep(ROUND_SLEEP_S)
        each_live(work)

    each_live(start)
    evaluate(0)
    shared = groups[0].configs[0]
    for step in range(1, shared.steps + 1):
        if step % shared.log_every == 0 or step == shared.steps:
            log(step)
        if step % shared.eval_every == 0 or step == shared.steps:
            evaluate(step)
    seconds = time.perf_counter() - started
    return [
        GroupOutcome([], errors[g])
        if g in errors
        else GroupOutcome([TrainResult(shared.steps, seen, {}, STUB_INFO, seconds) for seen in last[g]], None)
        for g in range(len(groups))
    ]


def stub_worker(spec_file: Path, worker: int, status_dir: Path) -> None:
    """A worker process (forked from a server that imported the engine once): `run_worker` with the stub
    trainer, its output in its log as `supervise`'s workers have it. It leaves with `os._exit`: what a worker
    must record is recorded before `run_worker` returns, and tearing down an interpreter that imported torch,
    MLflow and Optuna costs seconds a worker on 2 cores."""
    log = os.open(worker_log(status_dir.parent, worker), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # its parent is the fork server, which exits with the test's process: the worker dies with it
    code = run_worker(spec_file, worker, status_dir, os.getppid(), trainer=stub_trainer)
    print(f"run_worker returned {code} at {time.time():.2f}", flush=True)  # the rest of drain_s: exiting
    os._exit(code)


def pool_limit(size: int | None, overflow: int | None) -> int:
    """Connections one SQLAlchemy QueuePool opens at most: its size and overflow, else QueuePool's defaults."""
    defaults = inspect.signature(QueuePool.__init__).parameters
    return (size or defaults["pool_size"].default) + (overflow or defaults["max_overflow"].default)


def optuna_pool_limit() -> int:
    """Connections one process's Optuna storage opens at most (harness.sweep.storage's pool for servers)."""
    return pool_limit(SERVER_ENGINE_KWARGS["pool_size"], SERVER_ENGINE_KWARGS["max_overflow"])


def mlflow_pool_limit() -> int:
    """Connections one process's MLflow store opens at most (one engine per store URI and process; the
    harness leaves its pool to MLflow's environment variables)."""
    return pool_limit(MLFLOW_SQLALCHEMYSTORE_POOL_SIZE.get(), MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW.get())


class ConnectionCounter:
    """Counts, every `SAMPLE_EVERY_S` in a thread of its own, the backends connected to each database, keeping
    the highest counts. Its own connection is to the cluster's `postgres` database: it counts in neither."""

    def __init__(self, url: str, databases: dict[str, str]) -> None:
        self.url, self.databases = make_url(url), databases  # label -> database name
        self.highest = dict.fromkeys(databases, 0)
        self.highest_together = 0
        self.samples = 0
        self.max_connections = 0  # the cluster's
        self.stop = threading.Event()

    def sample(self, cursor: Any) -> None:
        query = "SELECT datname, count(*) FROM pg_stat_activity WHERE datname IN %s GROUP BY datname"
        while True:
            cursor.execute(query, (tuple(self.databases.values()),))
            by_name = dict(cursor.fetchall())
            counts = {label: int(by_name.get(name, 0)) for label, name in self.databases.items()}
            self.highest = {label: max(self.highest[label], n) for label, n in counts.items()}
            self.highest_together = max(self.highest_together, sum(counts.values()))
            self.samples += 1
            if self.stop.wait(SAMPLE_EVERY_S):
                return

    @contextmanager
    def running(self) -> Iterator[ConnectionCounter]:
        import psycopg2

        url = self.url
        connection = psycopg2.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres"
        )
        connection.autocommit = True
        cursor = connection.cursor()
        cursor.execute("SHOW max_connections")
        self.max_connections = int(cursor.fetchone()[0])
        thread = threading.Thread(target=self.sample, args=(cursor,), name="count-connections", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join()
            connection.close()


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    workers: int
    trials: int
    complete: int  # COMPLETE trials in the study afterwards
    wall_s: float  # the workers' start (spawning them included) to the last one's exit
    startup_s: float  # the workers' start to the first trial's (a worker imports torch, MLflow and Optuna)
    trial_span_s: float  # the first trial's start to the last one's end, as Optuna recorded them
    drain_s: float  # the last trial's end to the last worker's exit (a worker's last look, then its exit)
    trials_per_s: float  # trials / trial_span_s
    max_connections: dict[str, int]  # each database's highest count of connections
    max_connections_together: int
    connection_bound: dict[str, int]  # (workers + the coordinator) x the pool of one process
    cluster_max_connections: int
    samples: int
    exit_codes: list[int | None]

    def json_line(self) -> str:
        return json.dumps(asdict(self))


def write_study(folder: Path, trials: int) -> Path:
    doc = {
        "name": STUDY,
        "objective": {"metric": OBJECTIVE, "direction": "maximize"},
        "trials": trials,
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},  # the objective still goes to the pruner at each evaluation; none is pruned
        "train": TRAIN,
        "search": SEARCH,
    }
    path = folder / f"{STUDY}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def open_load_sweep(spec: StudySpec, study_file: Path, artifacts: Path) -> Sweep:
    """The study and its parent run, opened as `run_sweep` opens them before it starts its workers. The
    experiment is made first, its artifacts in `artifacts`: on a database store MLflow would put them under
    the working directory."""
    client = tracking.client_for(spec.tracking_uri)  # creates MLflow's schema, once, before any worker
    kind = {tracking.EXPERIMENT_KIND_TAG: tracking.EXPERIMENT_KIND}
    client.create_experiment(spec.name, artifact_location=artifacts.as_uri(), tags=kind)
    return open_sweep(spec, str(study_file))


def supervise_stubs(sweep: Sweep, processes: Sequence[BaseProcess], deadline: float, status_dir: Path) -> None:
    """`supervise`'s loop over the stub workers: recover lost trials when one exits and every
    RECOVER_EVERY_S; TimeoutError past `deadline`, with the workers' logs."""
    alive, recovered = len(processes), time.monotonic()
    while alive:
        time.sleep(0.5)
        now_alive = sum(process.is_alive() for process in processes)
        if now_alive < alive or time.monotonic() - recovered > RECOVER_EVERY_S:
            recover(sweep)
            alive, recovered = now_alive, time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} workers still running past the deadline:\n{worker_logs(status_dir)}")


def worker_log(folder: Path, worker: int) -> Path:
    """A stub worker's log in the folder of `run_load`."""
    return folder / "status" / f"worker-{worker}.log"


def worker_logs(status_dir: Path) -> str:
    return "\n".join(log_tail(log) for log in sorted(status_dir.glob("*.log")))


def run_load(optuna_url: str, mlflow_url: str, folder: Path, workers: int, trials: int, timeout_s: float) -> LoadResult:
    """Run a study of `trials` stub trials with `workers` spawned worker processes, as `harness sweep
    --workers` does, on two PostgreSQL databases; close its parent run as the coordinator does."""
    quiet_optuna()
    study_file = write_study(folder, trials)
    spec = load_study_spec(study_file, storage=optuna_url, tracking_uri=mlflow_url)
    sweep = open_load_sweep(spec, study_file, folder / "artifacts")
    status_dir = folder / "status"
    status_dir.mkdir()
    spec_file = status_dir / "study.json"  # the workers' spec, as `supervise` writes it
    spec_file.write_text(spec.model_copy(update={"tracking_uri": sweep.client.tracking_uri}).model_dump_json())
    databases = {"optuna": str(make_url(optuna_url).database), "mlflow": str(make_url(mlflow_url).database)}
    # A fresh process that imports the engine once and forks each worker from it: not 8 interpreters importing
    # torch, MLflow and Optuna at once on 2 cores (a minute and a half of the test's wall time, spawned).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.engine_load"])
    processes = [
        context.Process(target=stub_worker, args=(spec_file, i, status_dir), name=f"stub-worker-{i}")
        for i in range(workers)
    ]
    with ConnectionCounter(optuna_url, databases).running() as counter:
        recover(sweep)
        started, started_at = time.monotonic(), time.time()
        try:
            for process in processes:
                process.start()
            supervise_stubs(sweep, processes, started + timeout_s, status_dir)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join()
        wall_s, ended_at = time.monotonic() - started, time.time()
        wind_up(sweep, RunStatus.FINISHED)
    done = sweep.study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in done if t.datetime_start is not None]
    ends = [t.datetime_complete for t in done if t.datetime_complete is not None]
    assert starts and ends, f"no trial ran:\n{worker_logs(status_dir)}"
    first, last = min(starts).timestamp(), max(ends).timestamp()  # Optuna's times are the local clock's
    per_process = {"optuna": optuna_pool_limit(), "mlflow": mlflow_pool_limit()}
    return LoadResult(
        workers=workers,
        trials=trials,
        complete=sum(t.state == TrialState.COMPLETE for t in done),
        wall_s=round(wall_s, 2),
        startup_s=round(first - started_at, 2),
        trial_span_s=round(last - first, 2),
        drain_s=round(ended_at - last, 2),
        trials_per_s=round(trials / (last - first), 2),
        max_connections=counter.highest,
        max_connections_together=counter.highest_together,
        connection_bound={label: (workers + 1) * limit for label, limit in per_process.items()},
        cluster_max_connections=counter.max_connections,
        samples=counter.samples,
        exit_codes=[process.exitcode for process in processes],
    )
