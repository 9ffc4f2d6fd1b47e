"""Stops asked from outside. Ctrl-C (SIGINT) and SIGTERM (`timeout`, Kubernetes, SLURM preemption,
systemd) both raise Interrupted, a KeyboardInterrupt, so every path that winds up after Ctrl-C winds up
after SIGTERM too: trials end interrupted, runs are closed, the exit code is 128 + the signal's number.
Bookkeeping holds them off until a store write is done."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal was received."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_stop(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def stop_signals_raise() -> None:
    """From now on SIGINT and SIGTERM raise Interrupted (in the main thread, between two Python steps)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, raise_on_stop)


def signal_of(err: KeyboardInterrupt) -> int:
    """The stop signal behind an interrupt: SIGINT for Python's own KeyboardInterrupt."""
    return err.signum if isinstance(err, Interrupted) else signal.SIGINT


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal_of(err)


def reason(err: KeyboardInterrupt) -> str:
    """`interrupted` for Ctrl-C, `interrupted (SIGTERM)` for SIGTERM: the error a stopped trial and run keep."""
    signum = signal_of(err)
    return "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"


@contextmanager
def deferred() -> Iterator[None]:
    """A stop signal during bookkeeping takes effect when the block is done, not halfway through a store. Off the
    main thread, which never receives them, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, frame: received.append(s)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[signal.Signals(received[0])]
            if callable(handler):
                handler(received[0], None)  # raises, or an outer deferral records it and waits
            elif handler == signal.SIG_DFL:  # the signal would have ended the process
                raise Interrupted(received[0])


@contextmanager
def ignored() -> Iterator[None]:
    """No more stop signals while the command winds up: it is on its way out already."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
