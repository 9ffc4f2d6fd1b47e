"""The error every command turns into one line and exit code 2: bad input, named where it came from."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input: names the source (a file or `--set`), the dotted key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)
