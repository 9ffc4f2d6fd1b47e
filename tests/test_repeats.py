"""Seeds in lockstep: a pack's members train as if alone (as closely as summation order allows), a group
stops as a whole while the others go on, and a study with `repeats` judges each trial by its seeds'
aggregate, each seed's run nested under the trial's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.evaluate import Evaluation
from harness.sweep.seeds import aggregate, aggregate_metrics, spread_metrics
from harness.train import Group, GroupListener, train, train_pack
from tests.conftest import tiny_config
from tests.sweep_helpers import TINY_TRAIN, sweep_args, write_study
from tests.test_pack import FOLLOW_RTOL
from tests.test_train import Recorder, without_timing

JSON = ("--format", "json")


def assert_close_run(a: Recorder, b: Recorder) -> None:
    """`b` logged what `a` did, as closely as summation order allows (tests/test_pack.py says how close, and
    why): the same steps and names; the losses within FOLLOW_RTOL; the step-0 evaluation exactly (the same
    initial weights); later, the Fréchet distance within 5 % and the traversal grids within a few grey levels:
    what moves smoothly with the weights. Rates and counts do not: after a few steps the codes sort nothing
    yet, and a rounding difference flips the argmax of near-ties among the held-out digits (seen: a rate more
    than 0.02 apart); the continuous codes' ρ rank ties of measured properties."""
    assert [step for step, _ in a.logs] == [step for step, _ in b.logs]
    for (_, logged), (_, packed) in zip(a.logs, b.logs, strict=True):
        x, y = without_timing(logged), without_timing(packed)
        assert x.keys() == y.keys() and all(y[k] == pytest.approx(x[k], rel=FOLLOW_RTOL, abs=1e-3) for k in x)
    assert [e.step for e in a.evals] == [e.step for e in b.evals] and a.evals[0].metrics == b.evals[0].metrics
    for x, y in zip(a.evals, b.evals, strict=True):
        assert x.metrics.keys() == y.metrics.keys() and x.images.keys() == y.images.keys()
        assert y.metrics["eval/fld"] == pytest.approx(x.metrics["eval/fld"], rel=0.05)
        for name, grid in x.images.items():
            difference = np.abs(grid.astype(int) - y.images[name].astype(int))
            assert difference.max() <= 16 and difference.mean() <= 1


def test_members_of_a_pack_train_as_if_each_trained_alone(tmp_path: Path) -> None:
    configs = [tiny_config(tmp_path, "steps=6", f"seed={seed}") for seed in (3, 4)]
    alone = [Recorder() for _ in configs]
    for cfg, recorder in zip(configs, alone, strict=True):
        train(cfg, [recorder])
    together = [Recorder() for _ in configs]
    (outcome,) = train_pack([Group(configs, [[recorder] for recorder in together])])
    assert outcome.error is None and [r.steps for r in outcome.results] == [6, 6]
    for a, b in zip(alone, together, strict=True):
        assert_close_run(a, b)
    assert together[0].evals[-1].metrics != together[1].evals[-1].metrics  # two seeds, two models


class StopAt(GroupListener):
    """Stops its group at an evaluation round."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.stops: list[Exception] = []  # what on_stop was told

    def on_eval_round(self, step: int, evaluations: list[Evaluation]) -> None:
        if step == self.step:
            raise RuntimeError(f"stopped at step {step}")

    def on_stop(self, error: Exception) -> None:
        self.stops.append(error)


def test_a_group_stops_as_a_whole_and_the_other_groups_go_on(tmp_path: Path) -> None:
    diverging = tiny_config(tmp_path, "steps=6", "optim.lr_d=1e6")  # NaN losses within the first log window
    stopped = [tiny_config(tmp_path, "steps=6", f"seed={seed}") for seed in (1, 2)]
    fine = tiny_config(tmp_path, "steps=6", "seed=5")
    alone = Recorder()
    train(fine, [alone])
    recorders = [Recorder() for _ in range(4)]
    watchers = [StopAt(step=-1), StopAt(step=0), StopAt(step=-1)]  # step -1: never stops its group itself
    outcomes = train_pack(
        [
            Group([diverging], [[recorders[0]]], [watchers[0]]),
            Group(stopped, [[recorders[1]], [recorders[2]]], [watchers[1]]),
            Group([fine], [[recorders[3]]], [watchers[2]]),
        ]
    )
    assert type(outcomes[0].error).__name__ == "DivergenceError" and recorders[0].logs == []
    assert str(outcomes[1].error) == "stopped at step 0" and outcomes[1].results == []
    assert [w.stops for w in watchers] == [[outcomes[0].error], [outcomes[1].error], []]  # told once, when it stopped
    assert all(r.logs == [] and [e.step for e in r.evals] == [0] for r in recorders[1:3])  # both seeds stopped
    assert outcomes[2].error is None
    assert_close_run(recorders[3], alone)  # the groups beside it changed nothing


def test_pack_members_must_share_what_they_step_and_evaluate_by(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"share optim\.batch_size"):
        train_pack([Group([tiny_config(tmp_path), tiny_config(tmp_path, "optim.batch_size=16")], [[], []])])


def test_aggregates_and_spread_by_hand() -> None:
    assert aggregate([1.0, 2.0, 6.0], "mean") == 3.0
    assert aggregate([1.0, 2.0, 6.0], "median") == 2.0 and aggregate([1.0, 2.0, 6.0], "min") == 1.0
    assert aggregate_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}], "mean") == {"a": 2.0, "b": 2.0}
    spread = spread_metrics([{"m": 1.0, "n": 1.0}, {"m": 3.0}], ["m", "n"])  # n: not every seed logged it
    assert spread == {"seeds/m/std": 1.0, "seeds/m/min": 1.0, "seeds/m/max": 3.0}
    assert spread_metrics([{"m": 0.5}] * 3, ["m"])["seeds/m/std"] == 0.0  # identical seeds: no spread


@pytest.mark.slow
def test_a_study_with_repeats_judges_each_trial_by_its_seeds(
    tmp_path: Path, optuna_storage: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    study_file = write_study(
        tmp_path, "seeds", 1, {}, repeats=3, aggregate="median", train={**TINY_TRAIN, "seed": 4, "device": "cpu"}
    )
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output

    (trial,) = optuna.load_study(study_name="seeds", storage=optuna_storage).get_trials()
    client = MlflowClient(tracking_uri)
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    experiment = trial_run.info.experiment_id
    seed_runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{trial_run.info.run_id}'")
    seed_runs = sorted(seed_runs, key=lambda run: int(run.data.params["seed"]))
    assert [run.info.run_name for run in seed_runs] == [f"trial-0000-seed-{s}" for s in (4, 5, 6)]
    assert all(run.info.status == "FINISHED" and run.data.tags["harness.role"] == "seed" for run in seed_runs)
    assert all(client.list_artifacts(run.info.run_id, "traversals") for run in seed_runs)

    histories = [client.get_metric_history(run.info.run_id, "eval/cat_acc") for run in seed_runs]
    finals = [history[-1].value for history in histories]
    assert trial.value == pytest.approx(statistics.median(finals))
    assert trial.user_attrs["seeds"] == {"seeds": [4, 5, 6], "values": [[v] for v in finals]}
    medians = {m.step: statistics.median(h[i].value for h in histories) for i, m in enumerate(histories[0])}
    assert trial.intermediate_values == {1: pytest.approx(medians[2]), 2: pytest.approx(medians[4])}

    assert trial_run.info.status == "FINISHED" and trial_run.info.run_name == "trial-0000"
    assert (trial_run.data.params["repeats"], trial_run.data.params["aggregate"]) == ("3", "median")
    assert trial_run.data.params["seeds"] == "4 5 6" and trial_run.data.params["seed"] == "4"
    aggregated = client.get_metric_history(trial_run.info.run_id, "eval/cat_acc")
    assert {m.step: m.value for m in aggregated} == pytest.approx(medians)
    assert trial_run.data.metrics["seeds/eval/cat_acc/std"] == pytest.approx(np.std(finals))
    assert trial_run.data.metrics["seeds/eval/cat_acc/min"] == pytest.approx(min(finals))
    assert trial_run.data.metrics["seeds/eval/cat_acc/max"] == pytest.approx(max(finals))

    report = CliRunner().invoke(
        main,
        ["report", str(study_file), "--storage", optuna_storage, "--tracking-uri", tracking_uri, "-o", "-", *JSON],
    )
    assert report.exit_code == 0, report.output
    (row,) = json.loads(report.stdout)
    assert (row["value"], row["seeds"]) == (pytest.approx(trial.value), 3)
    assert (row["value_min"], row["value_max"]) == (pytest.approx(min(finals)), pytest.approx(max(finals)))
    assert row["value_std"] == pytest.approx(np.std(finals))
    assert row["seed_values"] == {str(seed): [pytest.approx(v)] for seed, v in zip((4, 5, 6), finals, strict=True)}


def test_seed_cannot_be_searched_with_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    search = {"seed": {"type": "int", "low": 0, "high": 9}}
    study_file = write_study(tmp_path, "clash", 2, search, repeats=2, train={**TINY_TRAIN})
    result = CliRunner().invoke(main, ["sweep", str(study_file)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {study_file}: search.seed: cannot be searched with repeats: 2")
    assert not (tmp_path / "mlruns").exists()
