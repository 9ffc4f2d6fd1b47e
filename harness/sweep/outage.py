"""Waiting out a storage database that went out of reach (stopped, restarting, unreachable): a call is tried
again, reconnecting, for up to STORAGE_OUTAGE_S (or $HARNESS_STORAGE_OUTAGE_S seconds); past that it raises
StorageUnavailable, one line."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TypeVar

from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import DBAPIError, OperationalError, PendingRollbackError, SQLAlchemyError

from harness.errors import ConfigError
from harness.urls import display_url

STORAGE_OUTAGE_S = 120.0
OUTAGE_ENV = "HARNESS_STORAGE_OUTAGE_S"  # overrides STORAGE_OUTAGE_S
OUTAGE_PAUSES_S = (0.5, 1.0, 2.0, 4.0)  # between tries, then the last one again

T = TypeVar("T")


class StorageUnavailable(Exception):
    """The storage's database stayed out of reach: nothing more can be recorded."""


def storage_outage_s() -> float:
    """How long a storage call waits out its database: $HARNESS_STORAGE_OUTAGE_S seconds, else STORAGE_OUTAGE_S;
    ConfigError when the variable is not a positive number."""
    text = os.environ.get(OUTAGE_ENV, "").strip()
    if not text:
        return STORAGE_OUTAGE_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(OUTAGE_ENV, "", f"must be a positive number of seconds, not {text!r}")
    return seconds


def lost_connection(err: BaseException | None) -> bool:
    """Whether a storage error is its database out of reach, not a bad statement: anywhere in the chain of
    what was raised (Optuna wraps SQLAlchemy's errors, and may meet a connection a restart cut while handling
    another error: PendingRollbackError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OperationalError | PendingRollbackError):
            return True
        if isinstance(err, DBAPIError) and err.connection_invalidated:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def outlasting(call: Callable[[], T], outage_s: float, url: str) -> T:
    """`call()`, tried again with pauses while the database at `url` is out of reach, for up to `outage_s`;
    then StorageUnavailable. Each try must be whole in itself (one transaction, rolled back if it failed)."""
    deadline, pauses = time.monotonic() + outage_s, iter(OUTAGE_PAUSES_S)
    while True:
        try:
            return call()
        except (SQLAlchemyError, StorageInternalError) as err:
            if not lost_connection(err):
                raise
            if time.monotonic() >= deadline:
                first_line = str(err.__cause__ or err).splitlines()[0]
                problem = f"did not answer for {outage_s:.0f} s: {first_line}"
                raise StorageUnavailable(f"the Optuna storage {display_url(url)} {problem}") from err
        time.sleep(next(pauses, OUTAGE_PAUSES_S[-1]))
