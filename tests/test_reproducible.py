"""One seed, one outcome across processes and stores: `harness train` twice, `harness sweep` twice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from tests.smoke_sweep import HARNESS, clean_env
from tests.sweep_helpers import TINY_TRAIN, WAIT_S, sweep_args, trials_of, write_study

Histories = dict[str, list[tuple[int, float]]]


def run_side_by_side(commands: list[list[str]], cwd: Path) -> None:
    """Run the commands as concurrent OS processes; each must exit 0."""
    processes = [
        subprocess.Popen(command, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for command in commands
    ]
    try:
        for process in processes:
            output, _ = process.communicate(timeout=WAIT_S)
            assert process.returncode == 0, output.decode(errors="replace")
    finally:
        for process in processes:
            process.kill()
            process.wait()


def metric_histories(tracking_uri: str, experiment: str) -> Histories:
    """Every metric of the experiment's one run: (step, value) in step order."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    return {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        for name in runs[0].data.metrics
    }


def final_weights(tracking_uri: str, experiment: str, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The experiment's one run's `model/weights.pt`: a state dict per module."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    run_id = client.search_runs([found.experiment_id])[0].info.run_id
    return torch.load(client.download_artifacts(run_id, "model/weights.pt", str(folder)), weights_only=True)


@pytest.mark.slow
def test_two_train_processes_with_one_seed_log_the_same_metrics(tmp_path: Path) -> None:
    """Two concurrent OS processes (each its own torch, generators and thread pool), each into its own
    store: the same history of every metric but the timings, and the same final weights."""
    overrides = (*TINY, f"data.root={tmp_path / 'no-data'}", "device=cpu", "seed=3")
    uris = [f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("first", "second")]
    command = ["train", "--experiment", "seeded", "--quiet", *(arg for o in overrides for arg in ("--set", o))]
    run_side_by_side([[HARNESS, *command, "--tracking-uri", uri] for uri in uris], tmp_path)

    first, second = (metric_histories(uri, "seeded") for uri in uris)
    assert set(first) == set(second) and "perf/images_per_s" in first
    timing = {name for name in first if name.startswith("perf/")}
    assert {"loss/d", "loss/g", "info/mi_cat", "eval/cat_acc"} <= set(first) - timing
    for name in sorted(set(first) - timing):
        assert first[name] == second[name], name
    assert [step for step, _ in first["loss/d"]] == [3, 6, 9, 12]
    weights = [
        final_weights(uri, "seeded", tmp_path / name) for uri, name in zip(uris, ("first", "second"), strict=True)
    ]
    for part in ("generator", "trunk", "d_head", "q_head"):
        assert weights[0][part].keys() == weights[1][part].keys()
        assert all(torch.equal(weights[0][part][key], weights[1][part][key]) for key in weights[0][part]), part


@pytest.mark.slow
def test_two_sweeps_with_one_sampler_seed_ask_the_same_params(tmp_path: Path) -> None:
    """Concurrent `harness sweep` processes, each into its own stores. One sampler seed asks the same params
    and gets the same values: TPE after its 2 random startup trials models the first values, so the third
    trial's params depend on them too. Another seed asks other params."""
    search = {
        "loss.lambda_cat": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
        "loss.lambda_con": {"type": "float", "low": 0.01, "high": 0.2},
    }
    sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 2}
    train = {**TINY_TRAIN, "device": "cpu"}
    study_file = write_study(tmp_path, "seeded", 3, search, sampler=sampler, train=train)

    def sweep(store: str, *more: str) -> tuple[list[str], str]:
        """The command of a sweep into its own stores, and its Optuna storage."""
        storage, tracking_uri = (f"sqlite:///{tmp_path / store / name}" for name in ("optuna.db", "mlflow.db"))
        (tmp_path / store).mkdir()
        return [HARNESS, *sweep_args(study_file, storage, tracking_uri, *more)], storage

    sweeps = [sweep("first"), sweep("second"), sweep("other-seed", "--trials", "1", "--set", "sampler.seed=1")]
    run_side_by_side([command for command, _ in sweeps], tmp_path)
    first, second, other_seed = (trials_of(storage, "seeded") for _, storage in sweeps)
    assert [t.params for t in first] == [t.params for t in second]
    assert [t.values for t in first] == [t.values for t in second]
    assert len({tuple(t.params.values()) for t in first}) == 3
    assert other_seed[0].params != first[0].params
