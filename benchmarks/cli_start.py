"""How long the CLI takes to start: the wall time of `harness --help` and other commands that train nothing.

    .venv/bin/python benchmarks/cli_start.py [--repeats 5] [--harness .venv/bin/harness]

Runs each command `--repeats` times, in turn, each in a fresh process as a user starts it, and prints one JSON
line: per command its best and median wall time in seconds (best of several: this host's speed swings, and the
best is the start itself, the rest is other work on the machine), and the load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("--help",), ("sweep", "--help"), ("report", "--help"))


def wall_s(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--harness", default=str(Path(sys.executable).parent / "harness"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {" ".join(c): [] for c in COMMANDS}
    for _ in range(args.repeats):  # interleaved: a burst of load touches every command alike
        for command in COMMANDS:
            times[" ".join(command)].append(wall_s([args.harness, *command]))
    result = {
        name: {"best_s": round(min(t), 3), "median_s": round(statistics.median(t), 3)} for name, t in times.items()
    }
    print(json.dumps({"harness": args.harness, "repeats": args.repeats, "load": os.getloadavg()[0], **result}))


if __name__ == "__main__":
    main()
