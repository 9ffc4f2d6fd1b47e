"""The MLflow server, run from this environment's `mlflow`: `harness ui` over the project's store and where
its pages show each experiment and each study's trials; `harness server`, the tracking server that workers on
other hosts log to, artifacts included, behind MLflow's basic authentication beyond loopback."""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from harness.errors import ConfigError
from harness.tracking import ROLE_TAG, STUDY_TAG, is_server
from harness.urls import display_url, missing_driver, sqlite_path

UI_START_TIMEOUT_S = 120.0  # a cold `mlflow server` on a busy 2-core machine takes ~20 s
STOP_TIMEOUT_S = 30
USERNAME_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"  # what MLflow's clients send
MIN_PASSWORD_LENGTH = 12  # MLflow's rule for its users' passwords
AUTH_CACHE_TTL_S = 60
SERVER_EXTRA = "pip install -e '.[server]'"
# Per uvicorn worker of the tracking server: connections to its database (SQLAlchemy's defaults, 5 + 10, are
# made once needed); 4 workers then hold at most 40 of PostgreSQL's 100.
SERVER_POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "5"}
EVERY_INTERFACE = ("0.0.0.0", "::", "")  # noqa: S104 - names, not binds
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


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def browse_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches a server bound to host:port."""
    return http_url("127.0.0.1" if host in EVERY_INTERFACE else host, port)  # every interface: reach it on loopback


def advertised_url(host: str, port: int) -> str:
    """The tracking URI that workers pass: the bound address, or this host's name when bound to every interface."""
    return http_url(socket.gethostname() if host in EVERY_INTERFACE else host, port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to `host`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: its address may be any
        return False


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


@dataclass(frozen=True)
class Credentials:
    """The tracking server's admin user, whom workers log in as."""

    username: str
    password: str


def credentials_from_env(env: Mapping[str, str]) -> Credentials | None:
    """MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, both or neither; a ConfigError otherwise, or when
    the password is too short for MLflow."""
    username, password = env.get(USERNAME_VAR, ""), env.get(PASSWORD_VAR, "")
    if not username and not password:
        return None
    if not username or not password:
        unset, other = (USERNAME_VAR, PASSWORD_VAR) if not username else (PASSWORD_VAR, USERNAME_VAR)
        raise ConfigError(unset, "", f"is not set while {other} is: set both (the server's admin, as workers do)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(PASSWORD_VAR, "", f"must be at least {MIN_PASSWORD_LENGTH} characters (MLflow's rule)")
    if importlib.util.find_spec("flask_wtf") is None:
        problem = f"authentication needs MLflow's basic-auth app, whose Flask-WTF is not installed: {SERVER_EXTRA}"
        raise ConfigError(USERNAME_VAR, "", problem)
    return Credentials(username, password)


def check_exposure(host: str, credentials: Credentials | None, insecure: bool) -> None:
    """Beyond loopback, a server needs authentication or an explicit `--insecure`."""
    if is_loopback(host) or credentials is not None or insecure:
        return
    raise ConfigError(
        "--host",
        host,
        f"serving beyond loopback needs authentication: set {USERNAME_VAR} and {PASSWORD_VAR} "
        "(the server's admin; workers set the same) or pass --insecure",
    )


def check_store(store: str) -> None:
    """A database URL whose driver is installed, not a server."""
    if is_server(store):
        raise ConfigError(
            "--store", store, "is a server, not a store: give its database (sqlite:///… or postgresql+psycopg2://…)"
        )
    problem = missing_driver(store)
    if problem is not None:
        raise ConfigError("--store", display_url(store), problem)


def auth_config(store: str, username: str) -> str:
    """MLflow's basic-auth configuration: its users in the tracking store's database (tables of their own),
    `username` its admin (the password comes from the environment, never a file), others may read. A checked
    password is trusted for a minute: checking costs half a second of CPU (PBKDF2), and a worker sends several
    requests a second."""
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {store}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
    )


def tracking_server_command(
    artifacts: Path, host: str, port: int, workers: int, auth: bool, allowed_hosts: list[str] | None
) -> list[str]:
    """This environment's `mlflow server` serving the artifacts itself, from `artifacts` (the store comes in
    MLFLOW_BACKEND_STORE_URI, out of sight of `ps`)."""
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts"]
    command += ["--artifacts-destination", artifacts.as_uri(), "--default-artifact-root", "mlflow-artifacts:/"]
    command += ["--host", host, "--port", str(port), "--workers", str(workers), "--uvicorn-opts", "--no-access-log"]
    if auth:
        command += ["--app-name", "basic-auth"]
    if allowed_hosts:
        command += ["--allowed-hosts", ",".join(allowed_hosts)]
    return command


def allowed_hosts(host: str, port: int) -> list[str] | None:
    """The Host headers the server accepts: MLflow's default (loopback and private addresses) and, bound to
    every interface, this host's name as `advertised_url` gives it; None to leave MLflow's default (and
    MLFLOW_SERVER_ALLOWED_HOSTS) alone."""
    if host not in EVERY_INTERFACE or os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS"):
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = dict.fromkeys((socket.gethostname(), socket.getfqdn()))
    return [*get_default_allowed_hosts(), *names, *(f"{name}:{port}" for name in names)]


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
def mlflow_server(
    command: list[str], env: Mapping[str, str], url: str, timeout_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    """`mlflow server` run as `command`, answering at `url`, until the block ends; then stopped."""
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runners
    process = subprocess.Popen(command, env=env)
    try:
        wait_until_up(url, process, timeout_s)
        yield process
    finally:
        process.terminate()  # `mlflow server` forwards it to uvicorn
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):  # uvicorn
                child.kill()
            process.kill()
            process.wait()


@contextmanager
def serve_ui(uri: str, host: str, port: int, timeout_s: float = UI_START_TIMEOUT_S) -> Iterator[UiServer]:
    """The MLflow UI over `uri` on host:port, answering, until the block ends; then stopped."""
    if is_server(uri):
        raise ConfigError("--tracking-uri", uri, "is already a server: open it in a browser")
    check_port_free(host, port)
    url = browse_url(host, port)
    with mlflow_server(ui_server_command(uri, host, port), os.environ, url, timeout_s) as process:
        yield UiServer(url, process)


@dataclass(frozen=True)
class TrackingServer:
    url: str  # where this machine reaches it
    tracking_uri: str  # what workers pass as --tracking-uri
    credentials: Credentials | None
    process: subprocess.Popen[bytes]


def check_credentials(url: str, credentials: Credentials, store: str) -> None:
    """ConfigError unless the server's basic auth lets the admin in: it was created, with its password, on the
    server's first start over this store."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    query = urllib.parse.urlencode({"username": credentials.username})
    request = urllib.request.Request(  # noqa: S310 - our own server's http:// URL
        f"{url}/api/2.0/mlflow/users/get?{query}", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with LOCAL_OPENER.open(request, timeout=30):
            return
    except urllib.error.HTTPError as err:
        if err.code != 401:
            raise
    user, where = credentials.username, display_url(store)
    problem = f"is not the password of user '{user}', which {where} keeps from the server's first start"
    raise ConfigError(PASSWORD_VAR, "", problem)


@contextmanager
def serve_tracking(
    store: str,
    artifacts: Path,
    host: str,
    port: int,
    workers: int,
    insecure: bool,
    timeout_s: float = UI_START_TIMEOUT_S,
) -> Iterator[TrackingServer]:
    """The tracking server over `store` on host:port, serving the artifacts from `artifacts`, answering, until
    the block ends; then stopped. With MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD set it runs
    MLflow's basic-auth app with that admin; beyond loopback it must, unless `insecure`."""
    check_store(store)
    credentials = credentials_from_env(os.environ)
    check_exposure(host, credentials, insecure)
    check_port_free(host, port)
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {**SERVER_POOL_ENV, **os.environ, "MLFLOW_BACKEND_STORE_URI": store}  # the user's pool sizes win
    url = browse_url(host, port)
    command = tracking_server_command(
        artifacts, host, port, workers, credentials is not None, allowed_hosts(host, port)
    )
    with tempfile.TemporaryDirectory(prefix="harness-server-") as private:  # 0700: the store URL has a password
        if credentials is not None:
            config = Path(private) / "basic_auth.ini"
            config.write_text(auth_config(store, credentials.username), encoding="utf-8")
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password}
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # CSRF of the UI's forms
            env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # the admin is the workers' user
        with mlflow_server(command, env, url, timeout_s) as process:
            if credentials is not None:
                check_credentials(url, credentials, store)
            yield TrackingServer(url, advertised_url(host, port), credentials, process)
