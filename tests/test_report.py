"""`harness report`: the trials table joined from real Optuna and MLflow stores (hand-made ones
laid out as `harness sweep` lays them out, and a real sweep's), its formats, the terminal summary,
the plots, and a missing study."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib import pyplot as plt
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from harness import tracking
from harness.cli import main
from harness.metric_names import EVAL_METRICS, LOG_METRICS
from harness.sweep.plots import PLOTS
from harness.sweep.runs import TrialEnd, close_trial_run
from tests.smoke_sweep import SweepStore, smoke_sweep

SEARCH = {"loss.lambda_cat": FloatDistribution(0.1, 2.0, log=True), "optim.lr_g": FloatDistribution(1e-4, 1e-3)}
STUDY_FILE = """\
name: {name}
{objectives}
trials: 5
storage: {storage}
tracking_uri: {tracking_uri}
search:
  loss.lambda_cat: {{type: float, low: 0.1, high: 2.0, log: true}}
  optim.lr_g: {{type: float, low: 1.0e-4, high: 1.0e-3}}
"""


def hand_made_study(
    tmp_path: Path, trials: list[dict[str, Any]], directions: list[str], metrics: list[str]
) -> tuple[Path, optuna.Study]:
    """A study file, an Optuna study and MLflow runs laid out as `harness sweep` lays them out,
    from `trials`: state, values, params, per-step metrics, the errors Optuna and the run keep,
    and whether the trial is a surplus one or never got a run."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "hand"
    objectives = "objectives:\n" + "".join(
        f"  - {{metric: {metric}, direction: {direction}}}\n"
        for metric, direction in zip(metrics, directions, strict=True)
    )
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE.format(name=name, objectives=objectives.rstrip(), storage=storage, tracking_uri=uri))
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    client = tracking.client_for(uri)
    experiment = tracking.ensure_experiment(client, name)
    parent = tracking.start_run(client, experiment, name)
    for number, trial in enumerate(trials):
        attrs = {key: trial[key] for key in ("error", "surplus") if key in trial}
        if not trial.get("no_run"):
            run_id = tracking.start_trial_run(client, name, parent, number, {})
            for step, values in trial.get("steps", {}).items():
                tracking.log_metrics(client, run_id, step, values)
            close_trial_run(client, run_id, TrialEnd[trial["state"].name], trial.get("run_error"))
            attrs["mlflow_run_id"] = run_id
        study.add_trial(
            create_trial(
                state=trial["state"],
                values=trial.get("values"),
                params=trial["params"],
                distributions={key: SEARCH[key] for key in trial["params"]},
                user_attrs=attrs,
            )
        )
    tracking.end_run(client, parent, "FINISHED")
    return path, study


def run(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study]:
    """Five trials that ran (complete, pruned, failed, one without a run) and a surplus one; read only."""
    params = [{"loss.lambda_cat": 0.2 * (i + 1), "optim.lr_g": 1e-4 * (i + 1)} for i in range(7)]
    trials = [
        {
            "state": TrialState.COMPLETE,
            "values": [0.5],
            "params": params[0],
            "steps": {6: {"eval/cat_acc": 0.3, "loss/d": 1.0}, 12: {"eval/cat_acc": 0.5, "loss/d": 0.9}},
        },
        {
            "state": TrialState.COMPLETE,
            "values": [0.8],
            "params": params[1],
            "steps": {6: {"eval/cat_acc": 0.9, "loss/d": 1.1}, 12: {"eval/cat_acc": 0.8, "loss/d": 0.7}},
        },
        {"state": TrialState.PRUNED, "params": params[2], "steps": {6: {"eval/cat_acc": 0.1, "loss/d": 1.3}}},
        {
            "state": TrialState.FAIL,
            "params": params[3],
            "error": "DivergenceError: non-finite loss",
            "run_error": "DivergenceError: non-finite loss at step 6",
        },
        {
            "state": TrialState.COMPLETE,
            "values": [0.2],
            "params": params[4],
            "steps": {12: {"eval/cat_acc": 0.2, "loss/d": 1.2}},
        },
        {"state": TrialState.FAIL, "params": params[5], "error": "OSError: disk full", "no_run": True},
        {"state": TrialState.FAIL, "params": params[6], "surplus": True, "no_run": True},  # never ran
    ]
    return hand_made_study(tmp_path_factory.mktemp("single"), trials, ["maximize"], ["eval/cat_acc"])


def test_table_joins_optuna_and_mlflow_best_first(single: tuple[Path, optuna.Study]) -> None:
    path, study = single
    result = run(["report", str(path), "-o", "-"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table["trial"]) == [1, 0, 4, 2, 3, 5]  # complete by value (maximize), pruned, failed; no surplus
    assert list(table["state"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert list(table.columns) == [
        "trial", "state", "value", "param.loss.lambda_cat", "param.optim.lr_g", "metric.eval/cat_acc",
        "metric.loss/d", "duration_s", "mlflow_run_id", "started", "finished", "error",
    ]  # fmt: skip
    by_trial = table.set_index("trial")
    assert by_trial.loc[1, "metric.eval/cat_acc"] == 0.8  # the last step's value, not the best
    assert by_trial.loc[0, "metric.loss/d"] == 0.9
    assert by_trial.loc[2, "metric.eval/cat_acc"] == 0.1 and pd.isna(by_trial.loc[2, "value"])
    assert pd.isna(by_trial.loc[3, "metric.eval/cat_acc"])
    assert by_trial.loc[3, "error"] == "DivergenceError: non-finite loss at step 6"  # the run's error
    assert by_trial.loc[5, "error"] == "OSError: disk full" and pd.isna(by_trial.loc[5, "mlflow_run_id"])
    assert by_trial["error"].drop([3, 5]).isna().all()
    for trial in study.trials[:5]:
        row = by_trial.loc[trial.number]
        assert row["mlflow_run_id"] == trial.user_attrs["mlflow_run_id"]
        assert row["param.loss.lambda_cat"] == pytest.approx(trial.params["loss.lambda_cat"])
        assert row["started"] == trial.datetime_start.isoformat(timespec="seconds")
        assert row["duration_s"] == pytest.approx(trial.duration.total_seconds(), abs=1e-3)
    summary = result.stderr  # the table owns stdout
    assert "6 trials (3 COMPLETE, 1 PRUNED, 2 FAIL); maximize eval/cat_acc" in summary
    assert "best parameters (trial 1): loss.lambda_cat=0.4, optim.lr_g=0.0002" in summary


def test_formats_and_default_output(
    single: tuple[Path, optuna.Study], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = single
    monkeypatch.chdir(tmp_path)
    result = run(["report", str(path)])
    assert result.exit_code == 0
    assert "wrote 6 trials to hand.csv" in result.output
    csv = pd.read_csv(tmp_path / "hand.csv")
    assert run(["report", str(path), "-o", "out.json"]).exit_code == 0
    records = json.loads((tmp_path / "out.json").read_text())
    assert [r["trial"] for r in records] == list(csv["trial"])
    assert records[-1]["error"] == "OSError: disk full" and records[-1]["value"] is None
    assert run(["report", str(path), "--format", "markdown", "-o", "out.txt"]).exit_code == 0
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[0].startswith("| trial | state | value | param.loss.lambda_cat |")
    assert len(lines) == 2 + 6 and lines[2].startswith("| 1 | COMPLETE | 0.8 |")


def test_multi_objective_pareto_first_and_plots(tmp_path: Path) -> None:
    params = [{"loss.lambda_cat": 0.5, "optim.lr_g": 1e-4 * (i + 1)} for i in range(4)]
    trials = [  # maximize cat_acc, minimize loss/d: trials 1 and 2 are the Pareto front
        {"state": TrialState.COMPLETE, "values": [0.5, 1.0], "params": params[0]},
        {"state": TrialState.COMPLETE, "values": [0.9, 0.9], "params": params[1]},
        {"state": TrialState.COMPLETE, "values": [0.4, 0.5], "params": params[2]},
        {"state": TrialState.FAIL, "params": params[3], "error": "boom", "run_error": "boom"},
    ]
    path, _ = hand_made_study(tmp_path, trials, ["maximize", "minimize"], ["eval/cat_acc", "loss/d"])
    plots = tmp_path / "plots"
    result = run(["report", str(path), "-o", "-", "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table["trial"]) == [1, 2, 0, 3]
    assert list(table.columns[2:4]) == ["value_0", "value_1"]
    assert "maximize eval/cat_acc, minimize loss/d" in result.stderr and "Pareto front" in result.stderr
    stems = {p.stem for p in plots.glob("*.html")}
    plotted = ("optimization_history", "param_importances", "parallel_coordinate", "slice")
    assert stems == {"pareto_front"} | {f"{p}_{m}" for p in plotted for m in ("eval_cat_acc", "loss_d")}
    for stem in [*stems, "curves"]:  # no traversals here to show: no best_traversals.png
        assert (plots / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in plots.iterdir()} == {f"{s}.{e}" for s in stems for e in ("html", "png")} | {
        "curves.png",
        "plotly.min.js",
    }
    for stem in stems:  # offline: plotly.js from the copy beside them, never a CDN
        html = (plots / f"{stem}.html").read_text()
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html


def test_missing_study_or_store_exits_2(single: tuple[Path, optuna.Study], tmp_path: Path) -> None:
    path, _ = single
    result = run(["report", str(path), "--study", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --study: no study 'nope' in sqlite:///{path.parent / 'optuna.db'} (it holds: hand)"
    ]
    missing = tmp_path / "elsewhere" / "optuna.db"
    result = run(["report", str(path), "--storage", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and "error: --storage: no Optuna storage at" in result.output
    assert not missing.exists()  # reading did not create it
    result = run(["report", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and result.output == f"error: {tmp_path / 'absent.yaml'}: no such file\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepStore:
    return smoke_sweep(tmp_path_factory)


@pytest.mark.slow
def test_report_of_a_real_sweep(sweep: SweepStore, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    args = ["report", str(sweep.study_file), "--storage", sweep.storage, "--tracking-uri", sweep.tracking_uri]
    result = run([*args, "-o", "-", "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    study = optuna.load_study(study_name="smoke", storage=sweep.storage)
    assert sorted(table["trial"]) == [trial.number for trial in study.trials]
    assert list(table["value"]) == sorted(table["value"], reverse=True)  # maximize: best first
    assert {c for c in table.columns if c.startswith("param.")} == {"param.loss.lambda_cat"}  # the searched key
    client = tracking.client_for(sweep.tracking_uri)
    for trial in study.trials:
        row = table.set_index("trial").loc[trial.number]
        assert (row["state"], row["value"]) == (trial.state.name, pytest.approx(trial.value))
        assert row["param.loss.lambda_cat"] == pytest.approx(trial.params["loss.lambda_cat"])
        history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "eval/cat_acc")
        assert row["metric.eval/cat_acc"] == pytest.approx(max(history, key=lambda m: m.step).value)
        assert not any(math.isnan(row[f"metric.{name}"]) for name in LOG_METRICS + EVAL_METRICS)
    assert f"{len(study.trials)} trials ({len(study.trials)} COMPLETE); maximize eval/cat_acc" in result.stderr
    assert f"best parameters (trial {study.best_trial.number}): loss.lambda_cat=" in result.stderr
    names = {f"{stem}.{ext}" for stem in (*PLOTS, "intermediate_values") for ext in ("html", "png")}
    names |= {"best_traversals.png", "curves.png", "plotly.min.js"}
    assert {path.name for path in plots.iterdir()} == names
    assert plt.imread(plots / "best_traversals.png").shape[1] == 2 * 320  # both trials, side by side
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "plots")}
    assert names <= logged  # the sweep logged its PNGs there too, the report adds the HTML
