"""The sweep engine under load, training left out: the wall time of tests/test_stress.py's load.

    .venv/bin/python benchmarks/engine_load.py [--workers 8] [--trials 200]

Starts a PostgreSQL cluster of its own (as the tests do: tests/postgres.py, loopback, a temporary folder),
makes two databases (Optuna's storage, MLflow's store), then runs tests/engine_load.py's load: `--workers`
worker processes claim and run `--trials` trials as `harness sweep --workers` does, each trained by
`stub_trainer` (a stub: a few rounds of listener calls, no model). Prints one JSON line: workers, trials,
trials COMPLETE afterwards, wall_s (spawning the workers to the last one's exit), trial_span_s (the first
trial's start to the last one's end) and trials_per_s over it, and the highest count of connections to each
database, with the bound the pools imply ((workers + the coordinator) x one process's pool).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package: the cluster and the load

from tests.engine_load import run_load
from tests.postgres import start_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8, help="worker processes")
    parser.add_argument("--trials", type=int, default=200, help="the study's trials")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the workers may take")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="harness-engine-load-"))
    try:
        cluster = start_cluster(folder)
        try:
            work = folder / "work"
            work.mkdir()
            os.chdir(work)  # whatever MLflow writes beside its store stays in the temporary folder
            optuna_url, mlflow_url = cluster.create_database("optuna"), cluster.create_database("mlflow")
            result = run_load(optuna_url, mlflow_url, work, args.workers, args.trials, args.timeout)
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(result.json_line(), flush=True)


if __name__ == "__main__":
    main()
