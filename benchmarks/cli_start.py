"""How long the CLI takes to start: the wall time of `harness --help` and other commands that train nothing.

    .venv/bin/python benchmarks/cli_start.py [--repeats 5] [--harness .venv/bin/harness ...]

Runs each command of each `--harness` executable (e.g. this checkout's and an older one's, side by side)
`--repeats` times, interleaved, each in a fresh process as a user starts it, and prints one JSON line per
executable: per command its best and median wall time in seconds (best of several: this host's speed swings,
and the best is the start itself, the rest is other work on the machine), and the load average at the end.
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
    parser.add_argument("--harness", nargs="+", default=[str(Path(sys.executable).parent / "harness")])
    args = parser.parse_args()
    times = {harness: {" ".join(c): list[float]() for c in COMMANDS} for harness in args.harness}
    for _ in range(args.repeats):  # interleaved: a burst of load touches every executable and command alike
        for harness in args.harness:
            for command in COMMANDS:
                times[harness][" ".join(command)].append(wall_s([harness, *command]))
    for harness, by_command in times.items():
        result = {
            name: {"best_s": round(min(t), 3), "median_s": round(statistics.median(t), 3)}
            for name, t in by_command.items()
        }
        print(json.dumps({"harness": harness, "repeats": args.repeats, "load": os.getloadavg()[0], **result}))


if __name__ == "__main__":
    main()
