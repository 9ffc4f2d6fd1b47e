"""`harness server`: its refusals (one line, exit 2, before anything binds) and, for real, the project's SQLite
store served with authentication, whose admin keeps the password of the server's first start."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import server
from harness.cli import main
from tests.postgres import free_port
from tests.smoke_sweep import HARNESS
from tests.test_scale_out import unauthenticated_status

NO_FLASK_WTF = "Flask-WTF is not installed (pip install -e '.[server]'): the authenticated server test did not run"
START_TIMEOUT_S = 150


def invoke(args: list[str], **env: str) -> tuple[int, str]:
    """`harness server ARGS` in this process, with only the given MLflow credentials in its environment."""
    clean = {"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None}
    result = CliRunner().invoke(main, ["server", *args], env={**clean, **env})
    return result.exit_code, result.output


def test_beyond_loopback_it_needs_authentication_or_insecure() -> None:
    code, output = invoke(["--host", "0.0.0.0"])  # noqa: S104 - refused before anything binds
    assert code == 2
    assert output == (
        "error: --host: 0.0.0.0: serving beyond loopback needs authentication: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (the server's admin; workers set the same) or pass --insecure\n"
    )
    code, output = invoke(["--host", "0.0.0.0"], MLFLOW_TRACKING_USERNAME="admin")  # noqa: S104
    assert code == 2
    assert output == (
        "error: MLFLOW_TRACKING_PASSWORD: is not set while MLFLOW_TRACKING_USERNAME is: set both (the server's "
        "admin, as workers do)\n"
    )
    code, output = invoke([], MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="short")  # noqa: S106
    assert code == 2
    assert output == "error: MLFLOW_TRACKING_PASSWORD: must be at least 12 characters (MLflow's rule)\n"


def test_a_bad_store_or_a_busy_port_is_one_line(tmp_path: Path) -> None:
    code, output = invoke(["--store", "http://127.0.0.1:5000"])
    assert code == 2
    assert output == (
        "error: --store: http://127.0.0.1:5000: is a server, not a store: give its database (sqlite:///… or "
        "postgresql+psycopg2://…)\n"
    )
    code, output = invoke(["--store", "postgresql+psycopg://harness:secret@127.0.0.1/mlflow"])
    assert code == 2
    assert output.startswith("error: --store: postgresql+psycopg://harness:***@127.0.0.1/mlflow: postgresql+psycopg")
    assert output.endswith("use postgresql+psycopg2:// after pip install -e '.[postgres]'\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = invoke(["--store", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)])
    assert code == 2
    assert output == f"error: --port: {port}: cannot listen on 127.0.0.1: Address already in use\n"


def test_workers_are_told_this_hosts_name_when_it_serves_every_interface() -> None:
    name = socket.gethostname()
    assert server.advertised_url("0.0.0.0", 5000) == f"http://{name}:5000"  # noqa: S104
    assert server.advertised_url("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    allowed = server.allowed_hosts("0.0.0.0", 5000)  # noqa: S104
    assert allowed is not None and {name, f"{name}:5000", "localhost", "127.0.0.1"} <= set(allowed)
    assert server.allowed_hosts("127.0.0.1", 5000) is None  # MLflow's own default: loopback and private networks
    assert server.is_loopback("127.0.0.2") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("example")  # noqa: S104


def start_server(cwd: Path, password: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [HARNESS, "server", "--port", str(port), "--workers", "1"]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("flask_wtf") is None, reason=NO_FLASK_WTF)
def test_the_project_store_served_with_authentication_keeps_its_admins_password(tmp_path: Path) -> None:
    port = free_port()
    first = start_server(tmp_path, "first-password-0", port)
    try:
        assert first.stdout is not None
        lines = []
        for line in first.stdout:  # until it answers
            lines.append(line)
            if line.startswith("workers: "):
                break
        output = "".join(lines)
        store, artifacts = tmp_path / "mlruns" / "mlflow.db", tmp_path / "mlruns" / "artifacts"
        assert f"MLflow tracking server over sqlite:///{store} at http://127.0.0.1:{port}, artifacts in " in output
        assert output.endswith(
            f"workers: harness sweep STUDY.yaml --tracking-uri http://127.0.0.1:{port}, with MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD set\n"
        ), output
        assert artifacts.is_dir() and store.is_file()
        assert unauthenticated_status(f"http://127.0.0.1:{port}") == 401
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    finally:
        kill_group(first)

    second = start_server(tmp_path, "second-password", port)  # the admin exists: its password stays the first
    try:
        output, _ = second.communicate(timeout=START_TIMEOUT_S)
    finally:
        kill_group(second)
    assert second.returncode == 2, output
    assert output.splitlines()[-1] == (
        f"error: MLFLOW_TRACKING_PASSWORD: is not the password of user 'admin', which sqlite:///{store} keeps from "
        "the server's first start"
    )
    assert not re.search(r"Traceback", output)
