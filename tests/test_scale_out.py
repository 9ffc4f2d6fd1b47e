"""The sweep beyond one machine, with real servers and real faults: `harness server` over a PostgreSQL store,
three `harness sweep` workers, each in its own folder with its own HOME (and, where `unshare` works, its own host
name), on one PostgreSQL storage and the server's http:// tracking URI. One worker is killed mid-trial,
PostgreSQL restarts mid-trial, the tracking server stops for ten seconds mid-trial; the study still reaches its
trial count, every metric arrives, every artifact downloads through the server, nothing is left running."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from harness.sweep import storage as sweep_storage
from tests.postgres import Postgres, free_port
from tests.smoke_sweep import HARNESS
from tests.test_sweep import LAMBDA_SEARCH, TINY_TRAIN, assert_nothing_running, counted_trials, sweep_args, write_study

STUDY = "faults"
TRIALS = 6
STEPS, EVAL_EVERY, LOG_EVERY = 24, 8, 4  # three evaluations after the baseline: room for a fault mid-trial
TRAIN = {**TINY_TRAIN, "steps": STEPS, "eval_every": EVAL_EVERY, "log_every": LOG_EVERY}
HEARTBEAT = {"interval_s": 1, "grace_s": 10}  # a killed worker's trial is lost within seconds, not a minute
WORKERS = 3
USERNAME = "sweeper"
POSTGRES_DOWN_S = 3.0
SERVER_DOWN_S = 10.0
SERVER_START_S = 150.0
WAIT_S = 300.0
HAS_FLASK_WTF = importlib.util.find_spec("flask_wtf") is not None
NO_FLASK_WTF = "Flask-WTF is not installed (pip install -e '.[server]'): the authenticated server test did not run"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def unshare_works() -> bool:
    """Whether this process may give a child a host name of its own (a UTS namespace: root, unconfined)."""
    try:
        return (
            subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=30, check=False).returncode == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Server:
    """`harness server` in its own process group, and its output."""

    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        answered = self.output().count("workers: ") + 1
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [HARNESS, "server", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait(
            lambda: self.output().count("workers: ") == answered, "harness server to answer", SERVER_START_S, self.alive
        )

    def stop(self) -> None:
        """SIGTERM, as `kill` sends: harness stops `mlflow server` and exits 0."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.output()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 0)
            raise AssertionError(f"mlflow server outlived harness server:\n{self.output()}")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def alive(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"harness server exited:\n{self.output()}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Worker:
    """One `harness sweep` in a folder of its own, which is also its HOME."""

    index: int
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.folder / "sweep.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(
    index: int, root: Path, storage: str, tracking_uri: str, env: dict[str, str], own_host: bool
) -> Worker:
    folder = root / f"worker-{index}"
    folder.mkdir()
    study_file = write_study(folder, STUDY, TRIALS, LAMBDA_SEARCH, train=TRAIN, heartbeat=HEARTBEAT)
    command = [sys.executable, "-m", "harness.cli", *sweep_args(study_file, storage, tracking_uri)]
    if own_host:  # sh names the host, then becomes harness: the pid stays the worker's
        command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"worker-{index}", *command]
    with (folder / "sweep.log").open("wb") as out:
        process = subprocess.Popen(
            command, cwd=folder, env={**env, "HOME": str(folder)}, stdout=out, stderr=subprocess.STDOUT
        )
    return Worker(index, folder, process)


def wait(condition: Callable[[], bool], what: str, timeout_s: float, check: Callable[[], None]) -> None:
    """Wait on a store condition, checking meanwhile that the processes it needs are alive."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@dataclass
class Faults:
    """What the test did when, for its assertions and its report."""

    notes: list[str] = field(default_factory=list)
    victim: FrozenTrial | None = None
    postgres_down: tuple[float, float] = (0.0, 0.0)  # epoch seconds
    postgres_running: list[int] = field(default_factory=list)
    server_down: tuple[float, float] = (0.0, 0.0)
    server_running: list[int] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(line)


@pytest.fixture
def stores(postgres: Postgres) -> tuple[str, str]:
    """A database for Optuna's storage and one for MLflow's store (both keep an alembic_version table)."""
    return postgres.create_database("optuna"), postgres.create_database("mlflow")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()


def mid_trial(trial: FrozenTrial) -> bool:
    """RUNNING, with its run, and evaluated at least once after training began, with evaluations to come."""
    return trial.state == TrialState.RUNNING and "mlflow_run_id" in trial.user_attrs and bool(trial.intermediate_values)


def metric_steps(client: MlflowClient, run_id: str, metric: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, metric)}


def last_logged_s(client: MlflowClient, run_id: str) -> float:
    """When the run's last loss or evaluation was logged, in seconds since the epoch."""
    history = [*client.get_metric_history(run_id, "loss/d"), *client.get_metric_history(run_id, "eval/cat_acc")]
    return max(m.timestamp for m in history) / 1000


def unauthenticated_status(url: str) -> int:
    try:
        with OPENER.open(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HAS_FLASK_WTF, reason=NO_FLASK_WTF)
def test_three_workers_on_postgresql_and_a_tracking_server_survive_a_kill_a_restart_and_an_outage(
    postgres: Postgres,
    stores: tuple[str, str],
    servers: list[Server],
    workers: list[Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    optuna_url, mlflow_url = stores
    password = secrets.token_hex(12)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERNAME)  # this test reads through the server as the workers do
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    port, artifacts = free_port(), tmp_path / "server" / "artifacts"
    server_args = ["--store", mlflow_url, "--artifacts", str(artifacts), "--port", str(port), "--workers", "2"]
    (tmp_path / "server").mkdir()
    server = Server(server_args, env, tmp_path / "server" / "server.log")
    servers.append(server)
    started = time.monotonic()
    server.start()
    tracking_uri = f"http://127.0.0.1:{port}"
    assert f"workers: harness sweep STUDY.yaml --tracking-uri {tracking_uri}, with MLFLOW_TRACKING_USERNAME" in (
        server.output()
    )
    assert password not in server.output() and postgres.password not in server.output()
    assert unauthenticated_status(tracking_uri) == 401
    faults = Faults()
    faults.note(f"harness server answered after {time.monotonic() - started:.0f} s")

    # An experiment an earlier SQLite store made keeps a folder for its artifacts: a worker would write there.
    MlflowClient(tracking_uri).create_experiment("legacy", artifact_location=(tmp_path / "legacy").as_uri())
    legacy_folder = tmp_path / "legacy-worker"
    legacy_folder.mkdir()
    legacy_study = write_study(legacy_folder, "legacy", 1, LAMBDA_SEARCH)
    refused = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *sweep_args(legacy_study, optuna_url, tracking_uri)],
        cwd=legacy_folder,
        env={**env, "HOME": str(legacy_folder)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    own_hosts = unshare_works()
    worker_env = {**env, "OMP_NUM_THREADS": "1"}  # three workers on this machine's cores
    for index in range(WORKERS):
        workers.append(start_worker(index, tmp_path, optuna_url, tracking_uri, worker_env, own_hosts))
    storage = sweep_storage.open_storage(optuna_url)  # reconnects after the restart below

    def trials() -> list[FrozenTrial]:
        if STUDY not in optuna.study.get_all_study_names(storage):
            return []
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials()

    def all_alive() -> None:
        server.alive()
        for worker in workers:
            if worker.index != 0 or faults.victim is None:
                assert worker.process.poll() is None, f"worker {worker.index} exited:\n{worker.output()}"

    # 1. SIGKILL a worker in the middle of a trial.
    victim = workers[0]

    def victim_mid_trial() -> bool:
        running = [t for t in trials() if mid_trial(t) and t.user_attrs["worker"]["pid"] == victim.process.pid]
        faults.victim = running[0] if running else None
        return faults.victim is not None

    wait(victim_mid_trial, "worker 0 mid-trial", WAIT_S, all_alive)
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    assert faults.victim is not None
    lost_number = faults.victim.number
    faults.note(f"killed worker 0 (pid {victim.process.pid}) in trial {lost_number} after its first evaluation")

    refused_output, _ = refused.communicate(timeout=WAIT_S)
    assert refused.returncode == 2, refused_output
    assert refused_output.strip().splitlines()[-1] == (
        f"error: {tracking_uri}: experiment 'legacy': keeps its artifacts in {(tmp_path / 'legacy').as_uri()}, a "
        "folder on the host that created it, which a client of the server would write on its own disk: use a new "
        "experiment (study) name, whose artifacts the server keeps"
    )
    assert not (tmp_path / "legacy").exists()

    # 2. Restart PostgreSQL, both stores' database, in the middle of the others' trials.
    wait(lambda: any(mid_trial(t) for t in trials()), "a trial mid-way", WAIT_S, all_alive)
    faults.postgres_running = [t.number for t in trials() if t.state == TrialState.RUNNING and t.number != lost_number]
    down = time.time()
    postgres.stop("fast")
    time.sleep(POSTGRES_DOWN_S)
    postgres.start()
    faults.postgres_down = (down, time.time())
    faults.note(
        f"PostgreSQL down for {faults.postgres_down[1] - down:.1f} s while trials {faults.postgres_running} ran"
    )

    # 3. Stop the tracking server for ten seconds in the middle of a trial.
    wait(lambda: any(mid_trial(t) for t in trials()), "a trial mid-way", WAIT_S, all_alive)
    faults.server_running = [t.number for t in trials() if mid_trial(t) and t.number != lost_number]
    down = time.time()
    server.stop()
    time.sleep(SERVER_DOWN_S)
    server.start()
    faults.server_down = (down, time.time())
    faults.note(
        f"tracking server down for {faults.server_down[1] - down:.1f} s while trials {faults.server_running} ran"
    )

    for worker in workers[1:]:
        assert worker.process.wait(timeout=WAIT_S) == 0, worker.output()
    faults.note(f"the sweep ended {time.monotonic() - started:.0f} s after the server was started")

    # The study: its trial count exactly; the killed worker's trial failed by its heartbeat and retried once.
    done = trials()
    assert all(t.state != TrialState.RUNNING for t in done)
    counted = counted_trials(done)
    assert len(counted) == TRIALS and all(t.state == TrialState.COMPLETE for t in counted), done
    lost = done[lost_number]
    assert lost.state == TrialState.FAIL
    retries = [t for t in done if "retry_of" in t.user_attrs]
    assert [t.user_attrs["retry_of"] for t in retries] == [lost_number], "one retry, of the killed worker's trial"
    (retry,) = retries
    assert retry.params == lost.params and retry in counted
    assert len(done) == TRIALS + 1 + sum(bool(t.user_attrs.get("surplus")) for t in done)
    reason = (
        "its heartbeat was silent for over 10 s" if own_hosts else f"its worker process {victim.process.pid} is gone"
    )
    assert retry.user_attrs.get("lost_because", "").startswith(reason), retry.user_attrs
    faults.note(f"trial {lost_number} was failed ({reason}) and retried once as trial {retry.number}")

    # MLflow, read through the server: one run per trial that ran, every one closed, every metric there.
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs: list[Run] = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = {int(run.data.tags["optuna.trial"]): run for run in runs if "optuna.trial" in run.data.tags}
    assert len(children) + 1 == len(runs)
    assert sorted(children) == sorted(t.number for t in done if "mlflow_run_id" in t.user_attrs)
    assert_nothing_running(done, list(children.values()), parents[0])
    assert parents[0].info.status == "FINISHED"
    lost_run = children[lost_number]
    assert lost_run.info.status == "KILLED" and lost_run.data.tags["harness.state"] == "LOST"
    assert lost_run.data.tags["error"] == f"{retry.user_attrs['lost_because']}; retried as trial {retry.number}"
    assert STEPS not in metric_steps(client, lost_run.info.run_id, "eval/cat_acc"), "the kill landed after training"
    for trial in counted:
        run_id = children[trial.number].info.run_id
        assert run_id == trial.user_attrs["mlflow_run_id"] and children[trial.number].info.status == "FINISHED"
        assert metric_steps(client, run_id, "loss/d") == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), trial.number
        assert metric_steps(client, run_id, "eval/cat_acc") == set(range(0, STEPS + 1, EVAL_EVERY)), trial.number
    assert faults.postgres_running, "no trial ran while PostgreSQL restarted"
    for number in faults.postgres_running:  # they waited for the database and finished
        assert done[number].state == TrialState.COMPLETE, done[number]
    assert faults.server_running, "no trial ran while the server was down"
    for number in faults.server_running:  # they waited for the server, and what they logged meanwhile arrived
        assert done[number].state == TrialState.COMPLETE, done[number]
        assert last_logged_s(client, children[number].info.run_id) > faults.server_down[1]

    # Every artifact of every trial downloads through the server; none was written where a worker runs.
    downloads = tmp_path / "downloads"
    for number, run in children.items():
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        folder = Path(client.download_artifacts(run.info.run_id, "", str(downloads / str(number))))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert "config.yaml" in files
        for step in range(0, STEPS + 1, EVAL_EVERY) if number != lost_number else ():
            for grid in ("cat0", "con0", "con1"):
                png = folder / f"traversals/step-{step:06d}/{grid}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (number, files)
    assert len(list(artifacts.rglob("*.png"))) >= 3 * len(range(0, STEPS + 1, EVAL_EVERY)) * TRIALS
    for worker in workers:
        written = [p.name for p in worker.folder.rglob("*") if p.suffix in (".png", ".pt", ".db") or p.name == "mlruns"]
        assert written == [], f"worker {worker.index} wrote {written}"
    faults.note(f"{len(children)} trial runs' artifacts downloaded through the server")
    print(json.dumps(faults.notes, indent=1))
