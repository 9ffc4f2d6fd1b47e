"""The MLflow server, run from this environment's `mlflow`: `harness ui` over the project's store, and
where its pages show each experiment and each study's trials."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
from mlflow.tracking import MlflowClient

from harness.config import ConfigError
from harness.tracking import ROLE_TAG, STUDY_TAG
from harness.urls import sqlite_path

UI_START_TIMEOUT_S = 120.0  # a cold `mlflow server` on a busy 2-core machine takes ~20 s
COMPARE_LIMIT = 100  # runs on one compare page: it slows down beyond a few hundred
LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for our own server


def runs_url(uri: str, experiment_id: str) -> str:
    """Where the runs table of an experiment lives in the MLflow UI (not the GenAI overview)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare page (parallel coordinates, scatter, contour) for these runs."""
    query = f"runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
    return f"{base_url.rstrip('/')}/#/compare-runs?{urllib.parse.quote(query, safe='=&')}"


@dataclass(frozen=True)
class ExperimentLinks:
    name: str
    runs: str  # the runs table (trials nest under their study's parent run)
    compare: str | None  # the compare page of the newest finished trial runs, if there are two or more


def experiment_links(client: MlflowClient, base_url: str) -> list[ExperimentLinks]:
    """Where each experiment's runs and, for a study, its trials' comparison are in the UI;
    an empty Default experiment is left out."""
    links = []
    for experiment in sorted(client.search_experiments(), key=lambda e: e.name):
        if experiment.name == "Default" and not client.search_runs([experiment.experiment_id], max_results=1):
            continue
        runs = client.search_runs(
            [experiment.experiment_id],
            "attributes.status = 'FINISHED'",
            max_results=COMPARE_LIMIT,
            order_by=["attributes.start_time DESC"],
        )
        trials = [run.info.run_id for run in runs if STUDY_TAG in run.data.tags and ROLE_TAG not in run.data.tags]
        compare = compare_url(base_url, experiment.experiment_id, trials) if len(trials) > 1 else None
        links.append(ExperimentLinks(experiment.name, runs_url(base_url, experiment.experiment_id), compare))
    return links


def browse_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches a server bound to host:port."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - bound to every interface: reach it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when host:port cannot be bound (in use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError("--port", str(port), f"cannot listen on {host}: {err.strerror}") from None


def ui_server_command(uri: str, host: str, port: int) -> list[str]:
    """This environment's `mlflow server` over the store; for SQLite, new artifacts go beside the db."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    path = sqlite_path(uri)
    if path is not None:
        root = (path.parent / "artifacts").as_uri()
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]  # runs keep their file:// artifacts
    return command


@dataclass(frozen=True)
class UiServer:
    url: str
    process: subprocess.Popen[bytes]


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll `<url>/health` until it answers; ConfigError if the server exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            code = process.returncode
            raise ConfigError("mlflow server", "", f"exited with code {code} before answering (its output is above)")
        try:
            with LOCAL_OPENER.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ConfigError("mlflow server", "", f"did not answer on {url} within {timeout_s:.0f}s")


@contextmanager
def serve_ui(uri: str, host: str, port: int, timeout_s: float = UI_START_TIMEOUT_S) -> Iterator[UiServer]:
    """The MLflow UI over `uri` on host:port, answering, until the block ends; then stopped."""
    if uri.startswith(("http://", "https://")):
        raise ConfigError("--tracking-uri", uri, "is already a server: open it in a browser")
    check_port_free(host, port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runners
    process = subprocess.Popen(ui_server_command(uri, host, port), env=env)
    try:
        url = browse_url(host, port)
        wait_until_up(url, process, timeout_s)
        yield UiServer(url, process)
    finally:
        process.terminate()  # `mlflow server` forwards it to uvicorn
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):  # uvicorn
                child.kill()
            process.kill()
            process.wait()
