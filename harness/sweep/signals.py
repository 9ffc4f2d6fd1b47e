"""Signals during bookkeeping: Ctrl-C waits until a store write is done, or is ignored on the way out."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C during bookkeeping takes effect when the block is done, not halfway through a store."""
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed and callable(previous):
            previous(signal.SIGINT, None)  # Python's handler raises KeyboardInterrupt; an outer deferral waits


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """No more Ctrl-C while the command winds up: it is on its way out already."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
