"""Mid-run checkpoints: a run killed outright goes on from its latest checkpoint (`harness train --resume`) and
ends bit for bit as the run that was never stopped; a checkpoint that cannot be used is one line and exit 2."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import run_logging, tracking
from harness.cli import main
from harness.evaluate import Evaluation
from harness.train import TrainListener, train
from tests.conftest import same_on_every_machine, tiny_config
from tests.sweep_helpers import LAMBDA_SEARCH, TINY_TRAIN, WAIT_S, sweep_args, trials_of, wait_for, write_study
from tests.worker_logs import log_tail

# A checkpoint at the evaluation at step 6, with a log window of 4 steps half-filled; six steps and an evaluation
# after it (seconds) for the kill to land in.
LONG = ("data.download=false", "optim.batch_size=32", "steps=12", "eval_every=6", "log_every=4", "seed=3")


def train_args(tracking_uri: str, tmp_path: Path, *more: str) -> list[str]:
    overrides = [arg for o in (*LONG, *same_on_every_machine(tmp_path)) for arg in ("--set", o)]
    return ["train", "--tracking-uri", tracking_uri, "--experiment", "ckpt", "--quiet", *overrides, *more]


def histories(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric but the timings: its last value at each step."""
    run = client.get_run(run_id)
    return {
        name: {m.step: m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp)}
        for name in run.data.metrics
        if not name.startswith("perf/")
    }


def final_weights(client: MlflowClient, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    path = client.download_artifacts(only_run_id(client), "model/weights.pt", str(folder))
    return torch.load(path, weights_only=True)


def start_harness(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """`harness ARGS` as a process of its own, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )


def kill_after_a_checkpoint(args: list[str], store: Path, cwd: Path) -> None:
    """`harness ARGS`, SIGKILLed as soon as a checkpoint is in `store`'s artifacts."""
    log = cwd / "killed.log"
    process = start_harness(args, cwd, log)
    try:
        wait_for(lambda: bool(list(store.rglob("checkpoints/latest.json"))), process, log)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def only_run_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name("ckpt")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return run.info.run_id


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_goes_on_and_ends_as_if_never_stopped(tmp_path: Path) -> None:
    """SIGKILL once a checkpoint is written, then `harness train --resume RUN_ID`: the same run ends FINISHED
    with every metric and weight of an uninterrupted `harness train` of the same seed, bit for bit."""
    whole, stopped = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("whole", "stopped"))
    result = CliRunner().invoke(main, train_args(whole, tmp_path))
    assert result.exit_code == 0, result.output

    kill_after_a_checkpoint(train_args(stopped, tmp_path), tmp_path / "stopped", tmp_path)
    client = MlflowClient(stopped)
    run_id = only_run_id(client)
    assert client.get_run(run_id).info.status == "RUNNING", "the kill landed after the run ended"

    result = CliRunner().invoke(main, ["train", "--tracking-uri", stopped, "--resume", run_id, "--quiet"])
    assert result.exit_code == 0, result.output
    resumed = client.get_run(run_id)
    step = int(resumed.data.tags[tracking.RESUMED_AT_TAG])
    assert resumed.info.status == "FINISHED" and step == 6
    expected = histories(MlflowClient(whole), only_run_id(MlflowClient(whole)))
    assert histories(client, run_id) == expected  # the steps before the kill, and after it, as the whole run's
    assert max(expected["eval/cat_acc"]) == 12
    weights = [final_weights(MlflowClient(uri), tmp_path / name) for uri, name in ((whole, "w"), (stopped, "s"))]
    for part in ("generator", "trunk", "d_head", "q_head"):
        assert all(torch.equal(weights[0][part][k], weights[1][part][k]) for k in weights[0][part]), part


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_its_step_and_the_run_goes_on_from_there(tmp_path: Path) -> None:
    """SIGTERM (preemption) once the first loss log is in, long before the first scheduled checkpoint (step 30):
    exit 143 with a checkpoint at the step it stopped at, from which --resume ends as the whole run."""
    more = ("--set", "steps=36", "--set", "eval_every=30", "--set", "log_every=2")
    whole, stopped = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("whole", "stopped"))
    result = CliRunner().invoke(main, train_args(whole, tmp_path, *more))
    assert result.exit_code == 0, result.output

    log = tmp_path / "stopped.log"
    process = start_harness(train_args(stopped, tmp_path, *more), tmp_path, log)
    try:
        wait_for(lambda: logged_a_loss(stopped), process, log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 143, log_tail(log)
    finally:
        process.kill()
        process.wait()
    client = MlflowClient(stopped)
    run_id = only_run_id(client)
    checkpoint = run_logging.load_checkpoint(client, run_id)
    assert checkpoint is not None and 2 <= checkpoint["step"] < 30  # saved at the stop, not on schedule
    assert client.get_run(run_id).info.status == "KILLED"

    result = CliRunner().invoke(main, ["train", "--tracking-uri", stopped, "--resume", run_id, "--quiet"])
    assert result.exit_code == 0, result.output
    assert client.get_run(run_id).data.tags[tracking.RESUMED_AT_TAG] == str(checkpoint["step"])
    assert histories(client, run_id) == histories(MlflowClient(whole), only_run_id(MlflowClient(whole)))


def logged_a_loss(tracking_uri: str) -> bool:
    """True once its one run has a loss/d point. The store is read only once the run wrote its config.yaml
    (so that no two processes create its tables at once)."""
    if not list(Path(tracking_uri.removeprefix("sqlite:///")).parent.rglob("config.yaml")):
        return False
    client = MlflowClient(tracking_uri)
    return bool(client.get_metric_history(only_run_id(client), "loss/d"))


class Checkpoints(TrainListener):
    """Keeps each checkpoint as it would be read back from a file, and every logged value but the timings."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, Any]] = {}
        self.logged: dict[int, dict[str, float]] = {}

    def on_log(self, step: int, values: dict[str, float]) -> None:
        self.logged[step] = {k: v for k, v in values.items() if not k.startswith("perf/")}

    def on_eval(self, evaluation: Evaluation) -> None:
        self.logged.setdefault(evaluation.step, {}).update(evaluation.metrics)

    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        self.saved[step] = torch.load(buffer, weights_only=True)


@pytest.mark.slow
def test_going_on_from_a_checkpoint_is_the_run_that_never_stopped(tmp_path: Path) -> None:
    """In-process, with the recipes' state (spectral norm's vectors, instance noise's generator, Q's own Adam), from
    the step-6 checkpoint of a run of 12 steps (a log window of 4 half-filled there)."""
    recipes = ("model.spectral_norm=dq", "loss.instance_noise=0.3", "optim.q_optimizer=own")
    cfg = tiny_config(tmp_path, "steps=12", "eval_every=6", "log_every=4", "checkpoint_every=6", *recipes)
    kept = Checkpoints()
    whole = train(cfg, [kept])
    assert list(kept.saved) == [6] and kept.saved[6]["window"]["steps"] == 2
    again = Checkpoints()
    resumed = train(cfg, [again], resume=kept.saved[6])
    assert sorted(again.logged) == [8, 12] and all(again.logged[s] == kept.logged[s] for s in again.logged)
    timing = {k for k in whole.metrics if k.startswith("perf/")}
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == {
        k: v for k, v in whole.metrics.items() if k not in timing
    }
    for part in ("generator", "trunk", "d_head", "q_head"):
        assert all(torch.equal(whole.weights[part][k], resumed.weights[part][k]) for k in whole.weights[part])


def test_only_the_latest_checkpoint_is_kept_and_a_finished_run_keeps_none(tracking_uri: str) -> None:
    client = tracking.client_for(tracking_uri)
    with run_logging.tracked_run(client, "ckpt", "kept") as run:
        for step in (2, 4, 6):
            run.on_checkpoint(step, {"step": step, "weights": torch.full((3,), float(step))})
        listed = sorted(a.path for a in client.list_artifacts(run.run_id, "checkpoints"))
        assert listed == ["checkpoints/latest.json", "checkpoints/step-000000006.pt"]
        checkpoint = run_logging.load_checkpoint(client, run.run_id)
        assert checkpoint is not None and checkpoint["step"] == 6 and checkpoint["weights"].tolist() == [6.0] * 3
    assert client.list_artifacts(run.run_id, "checkpoints") == []  # FINISHED: it has its final weights


def test_a_checkpoint_that_cannot_be_used_is_one_line(tracking_uri: str, tmp_path: Path) -> None:
    """No checkpoint (checkpoint_every 0), a corrupt one, a config given beside --resume: exit 2, one line."""
    no_checkpoints = ("--set", "steps=7", "--set", "eval_every=7", "--set", "checkpoint_every=0")
    args = train_args(tracking_uri, tmp_path, *no_checkpoints)
    assert CliRunner().invoke(main, args).exit_code == 0
    client = MlflowClient(tracking_uri)
    run_id = only_run_id(client)
    resume = ["train", "--tracking-uri", tracking_uri, "--resume", run_id]
    result = CliRunner().invoke(main, resume)
    assert (result.exit_code, result.output) == (
        2,
        f"error: --resume: {run_id}: cannot go on with this run: it saved no checkpoint\n",
    )

    run_logging.save_checkpoint(client, run_id, 6, {"step": 6})
    (saved,) = (tmp_path / "mlruns").rglob("checkpoints/step-000000006.pt")
    saved.write_bytes(saved.read_bytes()[:-1] + b"!")
    result = CliRunner().invoke(main, resume)
    assert result.exit_code == 2
    assert result.output == (
        f"error: --resume: {run_id}: cannot go on with this run: step-000000006.pt is corrupt "
        "(its SHA-256 is not the one recorded)\n"
    )
    result = CliRunner().invoke(main, [*resume, "--set", "seed=1"])
    assert result.exit_code == 2 and "takes neither a config file nor --set" in result.output
    assert client.get_run(run_id).info.status == "FINISHED"  # nothing recorded was changed


@pytest.mark.slow
def test_a_sweep_trial_killed_after_a_checkpoint_is_retried_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-trial sweep SIGKILLed once its trial saved a checkpoint, then the same command again: the retry goes
    on from that checkpoint (tags), its run shows the whole curve, and it ends with the value and every metric
    of the same trial swept without a stop, bit for bit; the checkpoints go once it completes."""
    monkeypatch.chdir(tmp_path)  # the bundled data's fallback, and nothing written into the repository
    train = {**TINY_TRAIN, "steps": 8, "checkpoint_every": None}  # checkpoints at the evaluations at 2, 4 and 6
    study_file = write_study(tmp_path, "resume", 1, LAMBDA_SEARCH, train=train)
    stores = {name: (tmp_path / name).resolve() for name in ("whole", "stopped")}
    args = {
        name: sweep_args(study_file, f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}")
        for name, folder in stores.items()
    }
    for folder in stores.values():
        folder.mkdir()
    assert CliRunner().invoke(main, args["whole"]).exit_code == 0

    kill_after_a_checkpoint(args["stopped"], stores["stopped"], tmp_path)
    result = CliRunner().invoke(main, args["stopped"])
    assert result.exit_code == 0, result.output

    (expected,) = trials_of(f"sqlite:///{stores['whole'] / 'optuna.db'}", "resume")
    lost, retry = trials_of(f"sqlite:///{stores['stopped'] / 'optuna.db'}", "resume")
    assert lost.state == TrialState.FAIL and retry.user_attrs["retry_of"] == lost.number
    assert retry.state == TrialState.COMPLETE and retry.values == expected.values
    client = MlflowClient(f"sqlite:///{stores['stopped'] / 'mlflow.db'}")
    whole = MlflowClient(f"sqlite:///{stores['whole'] / 'mlflow.db'}")
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags[tracking.RESUMED_FROM_TAG] == lost.user_attrs["mlflow_run_id"]
    assert int(retry_run.data.tags[tracking.RESUMED_AT_TAG]) in (2, 4, 6)
    assert histories(client, retry_run.info.run_id) == histories(whole, expected.user_attrs["mlflow_run_id"])
    for run_id in (lost.user_attrs["mlflow_run_id"], retry_run.info.run_id):
        assert client.list_artifacts(run_id, "checkpoints") == []
