"""The sweep beyond one machine, with real servers and real faults: `harness server` over a PostgreSQL store,
three `harness sweep` workers, each in its own folder with its own HOME and its own host name (a UTS namespace:
where `unshare` cannot make one, the test skips, and fails under HARNESS_NO_SKIPS=1), on one PostgreSQL storage
and the server's http:// tracking URI. One worker is killed mid-trial, PostgreSQL restarts mid-trial, the
tracking server stops for ten seconds mid-trial; the study still reaches its trial count, every metric arrives,
every artifact downloads through the server, nothing is left running."""

from __future__ import annotations

import contextlib
import importlib.util
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
from tests.sweep_helpers import (
    LAMBDA_SEARCH,
    TINY_TRAIN,
    assert_nothing_running,
    counted_trials,
    sweep_args,
    write_study,
)
from tests.worker_logs import log_tail

STUDY = "faults"
TRIALS = 5
STEPS, EVAL_EVERY, LOG_EVERY = 16, 8, 4  # a fault lands after the first evaluation, with half to go
TRAIN = {**TINY_TRAIN, "steps": STEPS, "eval_every": EVAL_EVERY, "log_every": LOG_EVERY}
# A restart under load silences every heartbeat for 5 to 8 s: a live worker's trial must never look lost then.
HEARTBEAT = {"interval_s": 1, "grace_s": 30}
WORKERS = 3
USERNAME = "sweeper"
POSTGRES_DOWN_S = 3.0  # a restart, as an upgrade or a failover makes one
SERVER_DOWN_S = 10.0
SERVER_START_S = 150.0
WAIT_S = 300.0
HAS_FLASK_WTF = importlib.util.find_spec("flask_wtf") is not None
NO_FLASK_WTF = "Flask-WTF is not installed (pip install -e '.[server]'): the authenticated server test did not run"
NO_UNSHARE = "`unshare --uts` does not work here (root, unconfined): the workers cannot have host names of their own"
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
        assert self.process.wait(timeout=SERVER_START_S) == 0, log_tail(self.log)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 0)
            raise AssertionError(f"mlflow server outlived harness server:\n{self.output()}")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def alive(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"harness server exited:\n{log_tail(self.log)}"

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

    def exited(self, code: int | None) -> str:
        return f"worker {self.index} exited with {code}:\n{log_tail(self.log)}"


def start_worker(index: int, root: Path, storage: str, tracking_uri: str, env: dict[str, str]) -> Worker:
    folder = root / f"worker-{index}"
    folder.mkdir()
    study_file = write_study(folder, STUDY, TRIALS, LAMBDA_SEARCH, train=TRAIN, heartbeat=HEARTBEAT)
    command = [sys.executable, "-m", "harness.cli", *sweep_args(study_file, storage, tracking_uri)]
    # its own host name, so that only its heartbeat tells whether it is alive; sh names the host, then becomes
    # harness: the pid stays the worker's
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
class Scene:
    """The servers, the workers and what the test did to them, when: for its waits, assertions and report."""

    postgres: Postgres
    optuna_url: str
    tracking_uri: str
    artifacts: Path
    server: Server
    workers: list[Worker]
    storage: optuna.storages.RDBStorage | None = None
    notes: list[str] = field(default_factory=list)
    victim: FrozenTrial | None = None
    postgres_running: list[int] = field(default_factory=list)
    server_down: tuple[float, float] = (0.0, 0.0)  # epoch seconds
    server_running: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, line: str) -> None:
        self.notes.append(f"{time.monotonic() - self.started:5.0f} s  {line}")

    def trials(self) -> list[FrozenTrial]:
        if self.storage is None:
            self.storage = sweep_storage.open_storage(self.optuna_url)  # it reconnects after a restart
        if STUDY not in optuna.study.get_all_study_names(self.storage):
            return []
        return optuna.load_study(study_name=STUDY, storage=self.storage).get_trials()

    def all_alive(self) -> None:
        self.server.alive()
        for worker in self.workers:
            if worker.index != 0 or self.victim is None:
                assert worker.process.poll() is None, worker.exited(worker.process.returncode)

    def kill_a_worker_mid_trial(self) -> int:
        """SIGKILL worker 0 in the middle of a trial; that trial's number."""
        victim = self.workers[0]

        def victim_mid_trial() -> bool:
            running = [t for t in self.trials() if mid_trial(t) and t.user_attrs["worker"]["pid"] == victim.process.pid]
            self.victim = running[0] if running else None
            return self.victim is not None

        wait(victim_mid_trial, "worker 0 mid-trial", WAIT_S, self.all_alive)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        assert self.victim is not None
        self.note(
            f"killed worker 0 (pid {victim.process.pid}) in trial {self.victim.number} after its first evaluation"
        )
        return self.victim.number

    def restart_postgres_mid_trial(self) -> None:
        """Stop PostgreSQL, both stores' database, for a few seconds while another worker is mid-trial (both,
        when they happen to be: their trials need not overlap)."""
        survivors = {worker.process.pid for worker in self.workers[1:]}

        def survivor_mid_trial() -> bool:
            running = [t for t in self.trials() if mid_trial(t) and t.user_attrs["worker"]["pid"] in survivors]
            self.postgres_running = [t.number for t in running]
            return bool(running)

        wait(survivor_mid_trial, "another worker mid-trial", WAIT_S, self.all_alive)
        down = time.monotonic()
        self.postgres.stop("fast")
        time.sleep(POSTGRES_DOWN_S)
        self.postgres.start()
        self.note(f"PostgreSQL down {time.monotonic() - down:.1f} s while trials {self.postgres_running} ran")

    def stop_server_mid_trial(self) -> None:
        """Stop the tracking server for ten seconds (and as long as it takes to start again) mid-trial."""

        survivors = {worker.process.pid for worker in self.workers[1:]}

        def some_mid_trial() -> bool:
            running = [t for t in self.trials() if mid_trial(t) and t.user_attrs["worker"]["pid"] in survivors]
            self.server_running = [t.number for t in running]
            return bool(running)

        wait(some_mid_trial, "a trial mid-way", WAIT_S, self.all_alive)
        down = time.time()
        self.server.stop()
        time.sleep(SERVER_DOWN_S)
        self.server.start()
        self.server_down = (down, time.time())
        self.note(f"tracking server down {self.server_down[1] - down:.1f} s while trials {self.server_running} ran")


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


def start_refused_sweep(scene: Scene, folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A sweep of an experiment that an earlier SQLite store made, whose artifacts live in a folder."""
    MlflowClient(scene.tracking_uri).create_experiment("legacy", artifact_location=(folder / "artifacts").as_uri())
    study_file = write_study(folder, "legacy", 1, LAMBDA_SEARCH)
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *sweep_args(study_file, scene.optuna_url, scene.tracking_uri)],
        cwd=folder,
        env={**env, "HOME": str(folder)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def check_study(scene: Scene, lost_number: int) -> list[FrozenTrial]:
    """Its trial count exactly, nothing running; the killed worker's trial failed by its heartbeat and retried
    once. The trials."""
    done = scene.trials()
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
    why = f"its heartbeat was silent for over {HEARTBEAT['grace_s']} s"
    assert retry.user_attrs.get("lost_because", "").startswith(why), retry.user_attrs
    scene.note(f"trial {lost_number} was failed ({why}) and retried once as trial {retry.number}")
    for number in scene.postgres_running:  # they waited for the database and finished
        assert done[number].state == TrialState.COMPLETE, done[number]
    for number in scene.server_running:  # they waited for the server and finished
        assert done[number].state == TrialState.COMPLETE, done[number]
    return done


def check_runs(scene: Scene, done: list[FrozenTrial], lost_number: int) -> dict[int, Run]:
    """Read through the server: one parent, one run per trial that ran, every one closed, every metric of every
    counted trial there, those logged during the server's outage too. The trial runs by number."""
    client = MlflowClient(scene.tracking_uri)
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
    (retry,) = [t for t in done if "retry_of" in t.user_attrs]
    assert lost_run.data.tags["error"] == f"{retry.user_attrs['lost_because']}; retried as trial {retry.number}"
    assert STEPS not in metric_steps(client, lost_run.info.run_id, "eval/cat_acc"), "the kill landed after training"
    for trial in counted_trials(done):
        run_id = children[trial.number].info.run_id
        assert run_id == trial.user_attrs["mlflow_run_id"] and children[trial.number].info.status == "FINISHED"
        assert metric_steps(client, run_id, "loss/d") == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), trial.number
        assert metric_steps(client, run_id, "eval/cat_acc") == set(range(0, STEPS + 1, EVAL_EVERY)), trial.number
    assert scene.server_running, "no trial ran while the server was down"
    for number in scene.server_running:  # training waited for the server: what came after the outage arrived
        assert last_logged_s(client, children[number].info.run_id) > scene.server_down[1]
    return children


def check_artifacts(scene: Scene, children: dict[int, Run], lost_number: int, downloads: Path) -> None:
    """Every trial run's artifacts download through the server; none was written where a worker runs."""
    client = MlflowClient(scene.tracking_uri)
    for number, run in children.items():
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        folder = Path(client.download_artifacts(run.info.run_id, "", str(downloads / str(number))))
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert "config.yaml" in files
        for step in range(0, STEPS + 1, EVAL_EVERY) if number != lost_number else ():
            for grid in ("cat0", "con0", "con1"):
                png = folder / f"traversals/step-{step:06d}/{grid}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (number, files)
    assert len(list(scene.artifacts.rglob("*.png"))) >= 3 * len(range(0, STEPS + 1, EVAL_EVERY)) * TRIALS
    for worker in scene.workers:
        written = [p.name for p in worker.folder.rglob("*") if p.suffix in (".png", ".pt", ".db") or p.name == "mlruns"]
        assert written == [], f"worker {worker.index} wrote {written}"
    scene.note(f"{len(children)} trial runs' artifacts downloaded through the server")


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
    if not unshare_works():  # the heartbeat is what this test checks, not the pid of a process on this host
        pytest.skip(NO_UNSHARE)
    optuna_url, mlflow_url = stores
    password = secrets.token_hex(12)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERNAME)  # this test reads through the server as the workers do
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    port, artifacts = free_port(), tmp_path / "server" / "artifacts"
    (tmp_path / "server").mkdir()
    server_args = ["--store", mlflow_url, "--artifacts", str(artifacts), "--port", str(port), "--workers", "1"]
    servers.append(Server(server_args, env, tmp_path / "server" / "server.log"))
    scene = Scene(postgres, optuna_url, f"http://127.0.0.1:{port}", artifacts, servers[0], workers)
    scene.server.start()
    scene.note("harness server answered")
    output = scene.server.output()
    assert f"--tracking-uri {scene.tracking_uri}, with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in output
    assert password not in output and postgres.password not in output
    assert unauthenticated_status(scene.tracking_uri) == 401

    worker_env = {**env, "OMP_NUM_THREADS": "1"}  # three workers share this machine's cores
    for index in range(WORKERS):
        workers.append(start_worker(index, tmp_path, optuna_url, scene.tracking_uri, worker_env))
    (tmp_path / "legacy").mkdir()
    refused = start_refused_sweep(scene, tmp_path / "legacy", env)

    lost_number = scene.kill_a_worker_mid_trial()
    scene.restart_postgres_mid_trial()
    scene.stop_server_mid_trial()
    for worker in workers[1:]:
        code = worker.process.wait(timeout=WAIT_S)
        assert code == 0, worker.exited(code)
    scene.note("both other workers ended, exit 0")

    refused_output, _ = refused.communicate(timeout=WAIT_S)
    assert refused.returncode == 2, refused_output
    assert refused_output.strip().splitlines()[-1] == (
        f"error: {scene.tracking_uri}: experiment 'legacy': keeps its artifacts in "
        f"{(tmp_path / 'legacy' / 'artifacts').as_uri()}, a folder on the host that created it, which a client of "
        "the server would write on its own disk: use a new experiment (study) name, whose artifacts the server keeps"
    )
    assert not (tmp_path / "legacy" / "artifacts").exists()

    done = check_study(scene, lost_number)
    children = check_runs(scene, done, lost_number)
    check_artifacts(scene, children, lost_number, tmp_path / "downloads")
    print("\n".join(scene.notes))
