"""`harness ui`: a real MLflow server over a store a real sweep filled, read through its REST API
and rendered in headless Chromium; its lifecycle and its refusals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from harness.cli import main
from tests.smoke_sweep import HARNESS, SweepStore, clean_env, smoke_sweep

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "chromium is not installed (apt-get install chromium; .ci/run installs it): the browser check did not run"
START_TIMEOUT_S = 150  # the CLI itself waits up to 120 s for the server
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Ui:
    url: str
    runs_url: str
    compare_url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """`harness ui` in its own process group (it, `mlflow server` and uvicorn), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [HARNESS, "ui", *args],
            cwd=cwd,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(process: subprocess.Popen[bytes], log: Path, pattern: str) -> re.Match[str]:
    """The first match of `pattern` in the process's output, waiting for it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        assert process.poll() is None, f"harness ui exited with {process.returncode}:\n{log.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} within {START_TIMEOUT_S}s:\n{log.read_text()}")


def kill_group(process: subprocess.Popen[Any]) -> None:
    """Kill whatever is left of the process group this test started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def get(url: str) -> bytes:
    with OPENER.open(url, timeout=30) as response:
        return response.read()


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with OPENER.open(request, timeout=30) as response:
        return json.load(response)


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium renders for `url`, its own group killed afterwards."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=30000", "--dump-dom", url,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        dom, _ = process.communicate(timeout=120)
    finally:
        kill_group(process)
    return dom


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
    return smoke_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def ui(sweep: SweepStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    folder = tmp_path_factory.mktemp("ui")
    log = folder / "ui.log"
    process = start_ui(["--tracking-uri", sweep.tracking_uri, "--port", str(free_port())], folder, log)
    try:
        url = wait_for(process, log, r"MLflow UI over \S+ at (http://127\.0\.0\.1:\d+) ").group(1)
        runs = wait_for(process, log, r"smoke: runs (\S+)").group(1)
        compare = wait_for(process, log, r"smoke: compare trials (\S+)").group(1)
        yield Ui(url, runs, compare)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        finally:
            kill_group(process)


@pytest.mark.slow
def test_ui_serves_the_sweep_over_rest(ui: Ui, sweep: SweepStore) -> None:
    experiment = json.loads(get(f"{ui.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke"))["experiment"]
    assert ui.runs_url == f"{ui.url}/#/experiments/{experiment['experiment_id']}/runs"
    kind = {tag["key"]: tag["value"] for tag in experiment["tags"]}["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI opens on the runs table, not the GenAI overview
    search = {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    runs = post_json(f"{ui.url}/api/2.0/mlflow/runs/search", search)["runs"]
    tags = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"]["tags"]} for run in runs}
    parents = [run for run in runs if "mlflow.parentRunId" not in tags[run["info"]["run_id"]]]
    assert [run["info"]["run_name"] for run in parents] == ["smoke"]
    parent_id = parents[0]["info"]["run_id"]
    children = {run["info"]["run_name"]: run for run in runs if run not in parents}
    study = optuna.load_study(study_name="smoke", storage=sweep.storage)
    assert sorted(children) == [f"trial-{trial.number:04d}" for trial in study.trials]
    for trial in study.trials:
        run = children[f"trial-{trial.number:04d}"]
        assert run["info"]["run_id"] == trial.user_attrs["mlflow_run_id"]
        assert tags[run["info"]["run_id"]]["mlflow.parentRunId"] == parent_id
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["trial"] == str(trial.number)
        assert float(params["loss.lambda_cat"]) == pytest.approx(trial.params["loss.lambda_cat"])
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["eval/cat_acc"] == pytest.approx(trial.value)  # the last evaluation is the objective
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    steps = json.loads(get(f"{ui.url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=traversals"))["files"]
    last = max(step["path"] for step in steps)
    grids = json.loads(get(f"{ui.url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path={last}"))["files"]
    assert {Path(grid["path"]).name for grid in grids} == {"cat0.png", "con0.png", "con1.png"}
    png = get(f"{ui.url}/get-artifact?path={last}/cat0.png&run_uuid={run_id}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == grids[0]["file_size"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_ui_renders_the_study_in_chromium(ui: Ui, sweep: SweepStore, tmp_path: Path) -> None:
    study = optuna.load_study(study_name="smoke", storage=sweep.storage)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    table = chromium_dom(ui.runs_url, tmp_path / "profile-runs")
    assert f'row-id="{parent_id}"' in table  # the study's parent run, its trials nested under it
    assert re.search(r">smoke</span></a>", table)
    compare = chromium_dom(ui.compare_url, tmp_path / "profile-compare")
    trials = study.trials
    assert f"Comparing {len(trials)} Runs from 1 Experiment" in compare
    assert "Parallel Coordinates Plot" in compare
    for trial in trials:
        assert f"trial-{trial.number:04d}" in compare


@pytest.mark.slow
def test_ui_serves_the_default_store_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    process = start_ui(["--port", str(port)], tmp_path, tmp_path / "ui.log")
    try:
        store = re.escape(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # the project's default, in this cwd
        wait_for(process, tmp_path / "ui.log", rf"MLflow UI over {store} at http://127\.0\.0\.1:{port} ")
        assert get(f"http://127.0.0.1:{port}/health") == b"OK"
        process.send_signal(signal.SIGINT)  # to harness only: it must stop the server itself
        assert process.wait(timeout=60) == 0
        assert not group_alive(process.pid), "mlflow server outlived harness ui"
    finally:
        kill_group(process)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as a server binds
        sock.bind(("127.0.0.1", port))  # the port is free again: nothing listens there


def test_ui_refuses_a_busy_port_and_a_server_uri(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--tracking-uri", uri, "--port", str(port)])
    assert result.exit_code == 2
    assert result.output == f"error: --port: {port}: cannot listen on 127.0.0.1: Address already in use\n"
    result = CliRunner().invoke(main, ["ui", "--tracking-uri", "http://127.0.0.1:5000"])
    assert result.exit_code == 2
    assert result.output == "error: --tracking-uri: http://127.0.0.1:5000: is already a server: open it in a browser\n"
