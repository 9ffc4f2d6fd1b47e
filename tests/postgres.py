"""A real PostgreSQL cluster for the tests, on loopback, in a temporary folder: one per session, started as the
`postgres` user when we are root (PostgreSQL refuses to run as root), stopped at the end. Each test creates its
own databases. Where PostgreSQL cannot be started, the tests that need it are skipped, saying why."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "harness"
START_TIMEOUT_S = 60
SERVER_SETTINGS = ("-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off")  # a test cluster


def binaries() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: on PATH, else Debian's newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Postgres:
    """A running cluster: its superuser's URLs, and stopping and starting it (a restart, as a fault)."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    password: str
    as_root: bool

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str) -> str:
        """A new, empty database; its URL."""
        import psycopg2

        name = f"{prefix}_{secrets.token_hex(4)}"
        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname="postgres"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return run_as_postgres(command, self.as_root)

    def start(self) -> None:
        options = " ".join(("-p", str(self.port), "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"))
        options += " " + " ".join(SERVER_SETTINGS)
        log = self.data_dir.parent / "postgres.log"
        result = self.pg_ctl("-l", str(log), "-w", "-t", str(START_TIMEOUT_S), "-o", options, "start")
        if result.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pg_ctl start: {result.stdout}{result.stderr}{text[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster: `fast` cuts every connection, as a restart of the database does."""
        result = self.pg_ctl("-m", mode, "-w", "-t", str(START_TIMEOUT_S), "stop")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop: {result.stdout}{result.stderr}")


def run_as_postgres(command: list[str], as_root: bool) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary as the `postgres` user when we are root, else as ourselves."""
    if as_root:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30, check=False)


def start_cluster(folder: Path) -> Postgres:
    """initdb and start a cluster in `folder` on a free loopback port; RuntimeError saying why it cannot."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("initdb is not installed (apt-get install postgresql; .ci/run installs it)")
    as_root = os.geteuid() == 0
    if as_root:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("we are root and there is no user 'postgres' to run PostgreSQL as") from None
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    password = secrets.token_hex(16)
    password_file = folder / "password"
    password_file.write_text(password, encoding="utf-8")
    if as_root:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    data_dir = folder / "data"
    initdb = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", USER, f"--pwfile={password_file}"]
    initdb += ["--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"]
    result = run_as_postgres(initdb, as_root)
    if result.returncode != 0:
        raise RuntimeError(f"initdb: {result.stderr.strip() or result.stdout.strip()}")
    cluster = Postgres(bin_dir, data_dir, folder, free_port(), password, as_root)
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's PostgreSQL cluster; the test is skipped, saying why, where it cannot be started."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[postgres]'): the PostgreSQL tests did not run")
    folder = Path(tempfile.mkdtemp(prefix="harness-postgres-"))  # not under pytest's root-only temp folder
    try:
        try:
            cluster = start_cluster(folder)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"PostgreSQL could not be started, the PostgreSQL tests did not run: {err}")
        try:
            yield cluster
        finally:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                cluster.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
