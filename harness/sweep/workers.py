"""Workers: the loop that claims and runs trials, and the processes of `harness sweep --workers N`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from harness import signals, tracking
from harness.data import DataFallbackWarning
from harness.device import default_pack, resolve_device
from harness.sweep.bookkeeping import (
    PARENT_ATTR,
    WORKER_ATTR,
    counted,
    next_trial,
)
from harness.sweep.display import Monitor, progress_watchers, say
from harness.sweep.outage import StorageUnavailable
from harness.sweep.recovery import recover, worker_identity
from harness.sweep.spec import (
    StudySpec,
)
from harness.sweep.storage import open_storage, quiet_optuna
from harness.sweep.study import Sweep, make_sampler, open_study
from harness.sweep.trial import TrialRuns, Watchers, interrupt_trial, run_trials
from harness.train import Trainer, train_pack

IDLE_POLL_S = 2.0  # a worker with nothing to start waits for running trials this long between looks
RECOVER_EVERY_S = 10.0
WORKER_STOP_TIMEOUT_S = 60


def work_loop(
    sweep: Sweep,
    deadline: float | None,
    watchers: Watchers,
    between: Callable[[], None],
    trainer: Trainer = train_pack,
) -> None:
    """Run trials, up to the study's pack at a time, until the study's places are all taken and none is
    running, or the deadline passes (running trials always finish). `between` runs before each pack and
    while waiting."""
    pack = sweep.spec.pack or default_pack(resolve_device(sweep.spec.train.device))
    while deadline is None or time.monotonic() < deadline:
        between()
        claimed: list[optuna.Trial] = []
        try:
            # under the lock: no two workers claim the last place; deferred: an asked trial that names no worker
            # would look alive for the grace period
            with signals.deferred(), sweep.lock():
                while len(claimed) < pack and (trial := next_trial(sweep.study, sweep.spec.trials)) is not None:
                    trial.set_user_attr(WORKER_ATTR, worker_identity())
                    claimed.append(trial)
                if claimed:
                    tracking.reopen_run(sweep.client, sweep.parent_run_id)  # another worker may have closed it
        except KeyboardInterrupt as err:
            for trial in claimed:
                interrupt_trial(sweep, trial, TrialRuns(), signals.reason(err))
            raise
        if claimed:
            run_trials(sweep, claimed, watchers, trainer)
            continue
        if not sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(IDLE_POLL_S)


def exit_with_parent(parent_pid: int) -> None:
    """A worker dies with its coordinator, as if killed with it (its trial is then recovered as lost)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(spec_file: Path, worker: int, status_dir: Path, parent_pid: int, trainer: Trainer = train_pack) -> int:
    """One worker process of `harness sweep --workers N`, on the coordinator's spec (JSON): trials until
    the study is done; 128 + the signal's number when stopped (130: Ctrl-C, 143: SIGTERM), 1 when the storage
    stayed out of reach."""
    exit_with_parent(parent_pid)
    quiet_optuna()
    warnings.filterwarnings("ignore", category=DataFallbackWarning)  # the coordinator said which data, once
    spec, source = StudySpec.model_validate_json(spec_file.read_text(encoding="utf-8")), str(spec_file)
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    heartbeat = spec.heartbeat
    storage = open_storage(spec.storage_url, heartbeat)
    study = open_study(spec, storage, source, create=False)
    study.sampler = make_sampler(spec, 7919 * (worker + 1) + len(study.get_trials(deepcopy=False)))
    client = tracking.client_for(spec.tracking_uri)
    sweep = Sweep(spec, study, storage, client, study.user_attrs[PARENT_ATTR], heartbeat)
    try:
        work_loop(sweep, deadline, progress_watchers(spec, status_dir, lambda: None), lambda: None, trainer)
    except KeyboardInterrupt as err:
        return signals.exit_code(err)
    except StorageUnavailable as err:  # its trial is recovered as lost once the storage is back
        print(f"error: {err}", flush=True)
        return 1
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
    the retries); 1 when one failed and the study fell short. A stop signal (Ctrl-C, SIGTERM) is passed on
    to the workers, which mark their trials interrupted."""
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
    except KeyboardInterrupt as err:
        with signals.ignored():
            stop_workers(processes, signals.signal_of(err))
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


def stop_workers(processes: Sequence[subprocess.Popen[bytes]], signum: int) -> None:
    """Pass a stop signal on to the running workers and wait for their bookkeeping; kill any that hangs."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)
    for process in processes:
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
