"""One lock per study, held in the store the study lives in, for the few moves that must not interleave
between the workers of one host or of many: creating the study and its parent run, claiming a place,
recovering lost trials, closing the parent run.

PostgreSQL: a session-level advisory lock (`pg_advisory_lock`), released by the server if its holder dies.
SQLite (one host): an exclusive `flock` on a file beside the database, released by the kernel if its holder
dies. Other databases get no lock: their workers fall back on the checks that tolerate a race (a surplus
trial is failed before it trains). The lock is re-entrant within a process."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optuna.storages import RDBStorage
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from harness.sweep.outage import outlasting, storage_outage_s
from harness.urls import sqlite_path

HELD: dict[tuple[str, str], int] = {}  # (storage URL, study) -> how deep this process holds its lock
GUARD = threading.RLock()  # one thread of a process at a time takes or re-takes a study lock


def advisory_key(study: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks, from the study's name."""
    digest = hashlib.blake2b(f"harness.study:{study}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def study_lock(storage: RDBStorage, url: str, study: str) -> Iterator[None]:
    """Hold the study's lock for the block, waiting for it as long as another process holds it."""
    key = (url, study)
    with GUARD:
        if HELD.get(key):
            HELD[key] += 1
            try:
                yield
            finally:
                HELD[key] -= 1
            return
        with store_lock(storage, url, study):
            HELD[key] = 1
            try:
                yield
            finally:
                HELD[key] = 0


@contextmanager
def store_lock(storage: RDBStorage, url: str, study: str) -> Iterator[None]:
    """The lock itself, by the kind of store."""
    database = sqlite_path(url)
    if database is not None:
        lock_file = Path(f"{database}.{hashlib.blake2b(study.encode(), digest_size=6).hexdigest()}.lock")
        with lock_file.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if storage.engine.dialect.name == "postgresql":
        # taken on a connection of its own; a restarting database is waited for, as the storage's calls wait
        with outlasting(lambda: advisory_locked(storage, study), storage_outage_s(), url) as connection:
            try:
                yield
            finally:
                with contextlib.suppress(SQLAlchemyError):  # a lost connection released the lock already
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": advisory_key(study)})
        return
    yield


def advisory_locked(storage: RDBStorage, study: str) -> Connection:
    """A new connection holding the study's advisory lock (waiting for it while another holds it)."""
    connection = storage.engine.connect()
    try:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": advisory_key(study)})
    except BaseException:
        connection.close()
        raise
    return connection
