"""Opening a store that another process may be creating at the same instant: the first to create its tables
wins, the others fail on a table or version row that now exists; they try again and find the store ready."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
ATTEMPTS = 5
RACE_SIGNS = ("already exists", "unique constraint", "duplicate key", "database is locked")


def created_once(open_store: Callable[[], T]) -> T:
    """`open_store()`, tried again while its failure reads as another process creating the same store."""
    for attempt in range(ATTEMPTS - 1):
        try:
            return open_store()
        except Exception as err:  # SQLAlchemy's and MLflow's errors alike
            if not any(sign in str(err).lower() for sign in RACE_SIGNS):
                raise
            time.sleep(0.2 * (attempt + 1))
    return open_store()
