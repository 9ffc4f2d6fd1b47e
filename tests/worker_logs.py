"""The end of a worker's log, for the message of an assertion on its exit code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

TAIL_LINES = 30


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    """A log's last `lines` lines, under a header naming it."""
    text = log.read_text(errors="replace") if log.exists() else "(no log written)"
    return f"--- {log}, last {lines} lines:\n" + "\n".join(text.splitlines()[-lines:])


def failed_workers(exit_codes: Sequence[int | None], logs: Sequence[Path]) -> str:
    """Each worker that exited non-zero (or not at all): its exit code and its log's end."""
    return "\n".join(
        f"worker {i} exited with {code}\n{log_tail(log)}"
        for i, (code, log) in enumerate(zip(exit_codes, logs, strict=True))
        if code != 0
    )
