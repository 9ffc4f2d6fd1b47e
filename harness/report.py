"""`harness report`: one row per trial, joined from Optuna and MLflow, a terminal summary and
Optuna's plots (HTML and PNG)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from harness import tracking
from harness.errors import ConfigError
from harness.report_figures import Curve, Panel, objective_curves, traversal_panels
from harness.sweep.bookkeeping import RUN_ATTR, SEEDS_ATTR, reported_trials, trial_error
from harness.sweep.plots import PLOTS_ARTIFACT_PATH
from harness.sweep.seeds import SPREAD
from harness.sweep.spec import load_study_spec
from harness.sweep.study import load_existing_study
from harness.text import format_value

Format = Literal["csv", "markdown", "json"]
FORMATS: dict[str, Format] = {"csv": "csv", "markdown": "markdown", "json": "json"}
SUFFIXES: dict[Format, str] = {"csv": ".csv", "markdown": ".md", "json": ".json"}
FORMAT_OF_SUFFIX: dict[str, Format] = {".md": "markdown", ".markdown": "markdown", ".json": "json"}
STATE_RANK = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
BEST_SHOWN = 5  # rows of the terminal's best-trials table


def value_columns(study: optuna.Study) -> list[str]:
    """`value` for one objective, `value_0`, `value_1`, ... for several."""
    count = len(study.directions)
    return ["value"] if count == 1 else [f"value_{i}" for i in range(count)]


@dataclass(frozen=True)
class LoadedStudy:
    name: str
    study: optuna.Study
    objectives: list[str]  # the objectives' metric names, one per direction
    client: MlflowClient
    runs: list[dict[str, Any]]  # tracking.trial_runs
    table: pd.DataFrame  # trials_table


def load_report(study_file: Path, study_name: str | None, storage: str | None, tracking_uri: str | None) -> LoadedStudy:
    """The study named by the file (or `--study`) from its Optuna storage, with its MLflow runs."""
    spec = load_study_spec(study_file, storage=storage, tracking_uri=tracking_uri)
    name = study_name or spec.name
    source = str(study_file)
    storage_source, name_source = "--storage" if storage else source, "--study" if study_name else source
    study = load_existing_study(spec.storage or "", name, storage_source, name_source)
    uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    if not tracking.store_exists(uri):
        where = ("--tracking-uri", "") if tracking_uri else (source, "tracking_uri")
        raise ConfigError(*where, f"no MLflow store at {uri}")
    client = tracking.client_for(uri)
    runs = tracking.trial_runs(client, name, name)
    objectives = [objective.metric for objective in spec.objective_list]
    if study.metric_names or len(objectives) != len(study.directions):  # names the sweep stored win
        objectives = list(study.metric_names or value_columns(study))
    return LoadedStudy(name, study, objectives, client, runs, trials_table(study, runs))


def iso(moment: datetime | None) -> str | None:
    """Optuna's local time to the second, ISO 8601."""
    return moment.isoformat(timespec="seconds") if moment else None


def optuna_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial that ran, from Optuna: number, state, values (with repeats: their spread over the
    seeds, the seeds and, for JSON, each seed's values), searched params, times, run id and the error the
    trial recorded."""
    columns = value_columns(study)
    rows = []
    for trial in reported_trials(study):
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update(zip(columns, trial.values or [math.nan] * len(columns), strict=True))
        row.update(seed_columns(trial.user_attrs.get(SEEDS_ATTR), columns))
        row.update({f"param.{key}": value for key, value in trial.params.items()})
        row["duration_s"] = round(trial.duration.total_seconds(), 3) if trial.duration is not None else math.nan
        row["mlflow_run_id"] = trial.user_attrs.get(RUN_ATTR)
        row["started"], row["finished"] = iso(trial.datetime_start), iso(trial.datetime_complete)
        row["error"] = trial_error(trial)
        rows.append(row)
    params = list(dict.fromkeys(key for row in rows for key in row if key.startswith("param.")))
    present = {key for row in rows for key in row}
    spread = [key for key in seed_column_names(columns) if key in present]
    times = ["duration_s", "mlflow_run_id", "started", "finished", "error"]
    return pd.DataFrame(rows, columns=["trial", "state", *columns, *spread, *params, *times])


def seed_column_names(columns: list[str]) -> list[str]:
    """The columns of a study with repeats, after the values: `value_std`, `value_min`, ..., `seeds`."""
    return [*(f"{c}_{stat}" for c in columns for stat in SPREAD), "seeds", "seed_values"]


def seed_columns(seeds: dict[str, Any] | None, columns: list[str]) -> dict[str, Any]:
    """A trial with repeats: each value's std, min and max over the seeds (std with ddof 0, as the trial
    run's seeds/<metric>/std), how many seeds, and each seed's values; nothing for a trial of one seed."""
    if not seeds:
        return {}
    per_seed = np.asarray(seeds["values"], dtype=np.float64)  # (seeds, objectives)
    row: dict[str, Any] = {}
    for column, values in zip(columns, per_seed.T, strict=True):
        row |= {f"{column}_std": values.std(), f"{column}_min": values.min(), f"{column}_max": values.max()}
    row["seeds"] = len(seeds["seeds"])
    row["seed_values"] = {str(seed): values for seed, values in zip(seeds["seeds"], seeds["values"], strict=True)}
    return row


def best_first(table: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Pareto-front trials (several objectives), then by state (COMPLETE first), then by the
    first objective in its direction, then by trial number."""
    first = value_columns(study)[0]
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    front = {trial.number for trial in study.best_trials} if len(study.directions) > 1 else set()
    keys = pd.DataFrame(
        {
            "front": ~table["trial"].isin(front),
            "rank": table["state"].map(STATE_RANK).fillna(len(STATE_RANK)),
            "value": sign * pd.to_numeric(table[first], errors="coerce"),
            "trial": table["trial"],
        }
    )
    order = keys.sort_values(["front", "rank", "value", "trial"], na_position="last").index
    return table.loc[order].reset_index(drop=True)


def trials_table(study: optuna.Study, runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Optuna's trials left-joined with their MLflow runs on the run id, best first, columns:
    trial, state, value(s), param.*, metric.*, duration_s, mlflow_run_id, started, finished, error."""
    trials = optuna_frame(study)
    mlflow = pd.DataFrame(runs, columns=sorted({key for run in runs for key in run} | {"mlflow_run_id", "error"}))
    mlflow = mlflow.drop(columns=["parent_run_id"], errors="ignore").drop_duplicates("mlflow_run_id")
    table = trials.merge(mlflow, on="mlflow_run_id", how="left", validate="many_to_one", suffixes=("", ".run"))
    table["error"] = table["error.run"].fillna(table["error"])  # the run's says more (e.g. "retried as trial 9")
    params = [c for c in table.columns if c.startswith("param.")]
    metrics = sorted(c for c in table.columns if c.startswith("metric."))
    spread = [c for c in seed_column_names(value_columns(study)) if c in table.columns]
    ordered = ["trial", "state", *value_columns(study), *spread, *params, *metrics]
    table = table[[*ordered, "duration_s", "mlflow_run_id", "started", "finished", "error"]]
    return best_first(table, study)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; empty cells for missing values."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return format_value(value, digits=6).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def render(table: pd.DataFrame, fmt: Format) -> str:
    """The table as CSV, markdown or JSON records; each seed's values (a mapping) in JSON only."""
    if fmt != "json":
        table = table.drop(columns=["seed_values"], errors="ignore")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2, double_precision=15) + "\n"
    return markdown(table)


def format_for(path: str | None, fmt: str | None) -> Format:
    """`--format` if given, else from the output's suffix (.md, .json), else CSV."""
    if fmt is not None:
        return FORMATS[fmt]
    return FORMAT_OF_SUFFIX.get(Path(path).suffix.lower() if path else "", "csv")


def summary(table: pd.DataFrame, study: optuna.Study, objectives: list[str], console: Console) -> None:
    """Counts by state, the best trials and the best parameters."""
    counts = table["state"].value_counts()
    states = ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index, key=lambda s: STATE_RANK.get(s, 9)))
    goals = ", ".join(
        f"{direction.name.lower()} {name}" for direction, name in zip(study.directions, objectives, strict=True)
    )
    console.print(f"[bold]study {study.study_name}[/]: {len(table)} trials ({states or 'none'}); {goals}")
    complete = table[table["state"] == "COMPLETE"]
    if complete.empty:
        console.print("no completed trial yet")
        return
    multi = len(study.directions) > 1
    best = complete.head(len(study.best_trials) if multi else BEST_SHOWN)
    shown = ["trial", *value_columns(study), *(c for c in table.columns if c.startswith("param.")), "duration_s"]
    grid = Table(title="Pareto front" if multi else f"best {len(best)} trials", title_justify="left")
    headers = dict(zip(value_columns(study), objectives, strict=True))  # the metric's name over its value
    for column in shown:
        header = headers.get(column, column.removeprefix("param."))
        grid.add_column(header, justify="left" if column == "trial" else "right")
    for row in best[shown].itertuples(index=False):
        grid.add_row(*(format_value(v) for v in row))
    console.print(grid)
    if not multi:
        params = ", ".join(f"{key}={format_value(value)}" for key, value in study.best_params.items())
        console.print(f"best parameters (trial {study.best_trial.number}): {params or 'none searched'}")


def write_pictures(loaded: LoadedStudy, folder: Path, best: int = BEST_SHOWN) -> list[Path]:
    """`best_traversals.png`, the last grid of the first categorical code of the `best` best complete trials
    (with repeats, their first seed's), captioned with trial, value ± spread and searched params; and
    `curves.png`, each objective against step for every trial that has a run."""
    folder.mkdir(parents=True, exist_ok=True)
    table, client, first = loaded.table, loaded.client, value_columns(loaded.study)[0]
    rows = cast(list[dict[str, Any]], table.to_dict(orient="records"))
    panels = []
    for row in [row for row in rows if row["state"] == "COMPLETE"][:best]:
        run_id = row["mlflow_run_id"]
        if row.get("seeds"):
            run_id = next(iter(tracking.seed_run_ids(client, run_id)), run_id)
        grid = tracking.last_traversal(client, run_id, "cat0")
        if grid is not None:
            panels.append(Panel(grid, caption(row, first, loaded.objectives[0])))
    written = []
    if panels:
        title = f"study {loaded.name}: the best {len(panels)} trials' categorical traversals (rows: noise)"
        written.append(save(traversal_panels(panels, title), folder / "best_traversals.png"))
    curves = {
        metric: [
            Curve(row["trial"], row["state"], tracking.metric_points(client, row["mlflow_run_id"], metric))
            for row in rows
            if isinstance(row["mlflow_run_id"], str)
        ]
        for metric in loaded.objectives
    }
    written.append(save(objective_curves(curves), folder / "curves.png"))
    return written


def caption(row: dict[str, Any], value: str, metric: str) -> str:
    """`trial 7: eval/cat_acc 0.812 ± 0.021` and a line per searched param."""
    std = row.get(f"{value}_std")
    spread = f" ± {format_value(std, 2)}" if isinstance(std, float) and not math.isnan(std) else ""
    params = [
        f"{key.removeprefix('param.')}={format_value(v, 3)}" for key, v in row.items() if key.startswith("param.")
    ]
    return "\n".join([f"trial {row['trial']}: {metric} {format_value(row[value], 3)}{spread}", *params])


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def log_plots(client: MlflowClient, runs: list[dict[str, Any]], paths: list[Path]) -> str | None:
    """Log the plots to the study's parent run (the newest trial run's parent); its id, or None."""
    parent = next((run["parent_run_id"] for run in runs if run.get("parent_run_id")), None)
    if parent is not None:
        tracking.log_files(client, parent, paths, PLOTS_ARTIFACT_PATH)  # beside the sweep's PNGs of the same names
    return parent
