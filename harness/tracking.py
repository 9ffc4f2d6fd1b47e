"""The project's MLflow calls: stores, experiments, runs, tags, metrics and artifacts, and reading them back.
Imports no torch: `harness ui`, `server` and `report` use it (a training run's logger is `harness.run_logging`)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import image as mpimg
from mlflow.entities import Experiment, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from harness.config import TrainConfig, flatten
from harness.errors import ConfigError
from harness.store_init import created_once
from harness.urls import absolute_url, display_url, missing_driver, sqlite_path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # opens the runs table rather than the GenAI overview
BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit)
# The project's run tags
ERROR_TAG = "error"  # why a run failed
CLOSED_TAG = "harness.closed_with"  # on a study's parent run: how many counted trials its summary holds
ROLE_TAG = "harness.role"  # "study" on a study's parent run, "seed" on a seed's run under its trial's
SEED_ROLE = "seed"
STUDY_TAG = "optuna.study"  # on trial runs only, so readers of a study's trials never see the parent
TRIAL_TAG = "optuna.trial"
STATE_TAG = "harness.state"  # how the trial ended: COMPLETE, PRUNED, FAIL, INTERRUPTED, LOST
RETRY_TAG = "harness.retry_of"  # on a retry's run: the number of the lost trial it replaces
RESUMED_FROM_TAG = "harness.resumed_from"  # on a retry's run that went on from a checkpoint: the lost run's id
RESUMED_AT_TAG = "harness.resumed_at_step"  # ... and the step it went on from
PACK_TAG = "harness.pack"  # on a trial's run: how many trials its worker trained with it as one model


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`--tracking-uri` beats MLFLOW_TRACKING_URI beats the project's SQLite store."""
    uri = absolute_url(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a SQLite store: `<db folder>/artifacts/<experiment>`; elsewhere the server decides."""
    path = sqlite_path(uri)
    if path is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (path.parent / "artifacts" / folder).as_uri()


# A process that writes to a database store itself, no server between: a small pool, like its Optuna storage's
# (MLflow's default, 5 + 10 a process, would let 7 workers hold PostgreSQL's 100 connections); the user's win.
DATABASE_STORE_POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "2", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "3"}


def client_for(uri: str | None) -> MlflowClient:
    """A client of the store or server at `uri`, the store made ready (created, if new) before it returns; a
    database driver that is missing is a ConfigError."""
    uri = resolve_tracking_uri(uri)
    problem = missing_driver(uri)
    if problem is not None:
        raise ConfigError(display_url(uri), "", problem)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a server's run links: ours say where
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded traversal
    if not is_server(uri) and not uri.startswith("sqlite"):
        for name, value in DATABASE_STORE_POOL_ENV.items():
            os.environ.setdefault(name, value)
    client = MlflowClient(tracking_uri=uri)
    created_once(lambda: client.search_experiments(max_results=1))
    return client


def is_server(uri: str) -> bool:
    """Whether a tracking URI is a tracking server rather than a store."""
    return uri.startswith(("http://", "https://"))


def check_artifact_location(uri: str, experiment: Experiment) -> None:
    """Through a tracking server, an experiment's artifacts must go through the server (or to an object
    store), never to a folder: a folder is on the disk of the host that created the experiment, and a client
    on another host would write it on its own disk."""
    location = experiment.artifact_location
    if is_server(uri) and urllib.parse.urlparse(location).scheme in ("", "file"):
        problem = (
            f"keeps its artifacts in {location}, a folder on the host that created it, which a client of the "
            "server would write on its own disk: use a new experiment (study) name, whose artifacts the server keeps"
        )
        raise ConfigError(uri, f"experiment '{experiment.name}'", problem)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created with the model-development kind if it is new. Through a tracking server,
    an experiment whose artifacts live in a folder is a ConfigError (see `check_artifact_location`)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(
            name,
            artifact_location=artifact_location(client.tracking_uri, name),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
        if not is_server(client.tracking_uri):
            return experiment_id
        experiment = client.get_experiment(experiment_id)
    elif experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    check_artifact_location(client.tracking_uri, experiment)
    return experiment.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), BATCH_LIMIT):
        client.log_batch(run_id, params=items[start : start + BATCH_LIMIT])


def log_metrics(client: MlflowClient, run_id: str, step: int, values: Mapping[str, float]) -> None:
    timestamp = int(1000 * time.time())
    client.log_batch(run_id, metrics=[Metric(key, float(v), timestamp, step) for key, v in values.items()])


def copy_metrics(client: MlflowClient, source_run_id: str, run_id: str, up_to_step: int) -> None:
    """Every metric point of one run up to `up_to_step`, into another (a resumed trial's curve before its
    checkpoint, so that its run shows the whole curve)."""
    points = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in client.get_run(source_run_id).data.metrics
        for m in client.get_metric_history(source_run_id, key)
        if m.step <= up_to_step
    ]
    for start in range(0, len(points), BATCH_LIMIT):
        client.log_batch(run_id, metrics=points[start : start + BATCH_LIMIT])


def config_params(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as MLflow params with dotted keys."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in flatten(cfg.model_dump()).items()}


def start_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    all_tags = {MLFLOW_RUN_NAME: run_name, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    commit = git_commit()
    if commit:
        all_tags["git.commit"] = commit
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def end_run(client: MlflowClient, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    """Close a run with a terminal status (FINISHED, FAILED or KILLED), tags first."""
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value[:5000])
    client.set_terminated(run_id, status=status)


# --- reading runs ---


def store_exists(uri: str) -> bool:
    """False only for a SQLite store whose file is missing (reading it would create it)."""
    path = sqlite_path(uri)
    return path is None or path.is_file()


def study_trial_runs(
    client: MlflowClient, experiment: str, study: str, filter_string: str = "", role: str | None = None
) -> Iterator[Run]:
    """The study's trial runs (tag `optuna.study`) in `experiment`, newest first, every page; with
    `role=SEED_ROLE`, the runs of their seeds instead."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    token: str | None = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        yield from (
            run for run in page if run.data.tags.get(STUDY_TAG) == study and run.data.tags.get(ROLE_TAG) == role
        )
        token = page.token
        if not token:
            return


def trial_runs(client: MlflowClient, experiment: str, study: str) -> list[dict[str, Any]]:
    """The study's trial runs, newest first: run and parent ids, the `error` tag and each
    metric's last value as `metric.<name>`."""
    rows: list[dict[str, Any]] = []
    for run in study_trial_runs(client, experiment, study):
        tags = run.data.tags
        row = {"mlflow_run_id": run.info.run_id, "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID)}
        row["error"] = tags.get(ERROR_TAG)
        row.update({f"metric.{name}": value for name, value in sorted(run.data.metrics.items())})
        rows.append(row)
    return rows


def metric_points(client: MlflowClient, run_id: str, metric: str) -> list[tuple[int, float]]:
    """A metric's (step, value) history in a run, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def seed_run_ids(client: MlflowClient, trial_run_id: str) -> list[str]:
    """The runs of a trial's seeds, nested under its run, by seed."""
    run = client.get_run(trial_run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        f"tags.{MLFLOW_PARENT_RUN_ID} = '{trial_run_id}' and tags.`{ROLE_TAG}` = '{SEED_ROLE}'",
    )
    return [r.info.run_id for r in sorted(found, key=lambda r: int(r.data.params.get("seed", 0)))]


def last_traversal(client: MlflowClient, run_id: str, grid: str) -> np.ndarray | None:
    """The run's traversal grid `grid` (e.g. cat0) of its last evaluation, (H, W, 3) floats; None without one."""
    steps = sorted(a.path for a in client.list_artifacts(run_id, "traversals") if a.is_dir)
    if not steps:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, f"{steps[-1]}/{grid}.png", folder)
        except MlflowException:
            return None
        return mpimg.imread(path)[..., :3]


def log_files(client: MlflowClient, run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Upload files to the run under `artifact_path`."""
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


# --- sweeps: parent and child runs ---


def open_study_run(
    client: MlflowClient, study: str, run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """The study's parent run, RUNNING: `run_id` reopened when this store holds it, else a new run
    named after the study with `params` (logged once: MLflow params never change)."""
    experiment_id = ensure_experiment(client, study)
    running = RunStatus.to_string(RunStatus.RUNNING)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None  # another tracking store than the study's first run used
        if run is not None and run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active":
            if run.info.status != running:
                client.update_run(run_id, status=running)
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
            return run_id
    run_id = start_run(client, experiment_id, study, {ROLE_TAG: "study", **tags})
    log_params(client, run_id, params)
    return run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Mark a closed run RUNNING again (a study's parent run while its trials go on)."""
    if client.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def closed_tag(client: MlflowClient, run_id: str, key: str) -> str | None:
    """Tag `key` of a closed run; None while the run is RUNNING or has no such tag."""
    run = client.get_run(run_id)
    return None if run.info.status == RunStatus.to_string(RunStatus.RUNNING) else run.data.tags.get(key)


def finish_study_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    step: int,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    texts: Mapping[str, str],
    figures: Mapping[str, Any],
) -> None:
    """Log the study's summary (metrics at `step`, tags, text files, matplotlib figures) and close its run."""
    if metrics:
        log_metrics(client, run_id, step, metrics)
    for artifact_file, text in texts.items():
        client.log_text(run_id, text, artifact_file)
    for artifact_file, figure in figures.items():
        client.log_figure(run_id, figure, artifact_file)
    end_run(client, run_id, status, tags)


def start_trial_run(client: MlflowClient, study: str, parent_run_id: str, number: int, tags: Mapping[str, str]) -> str:
    """A trial's child run `trial-0007` with param `trial`; the config's params come with RunLogger."""
    experiment_id = ensure_experiment(client, study)
    run_tags = {STUDY_TAG: study, TRIAL_TAG: str(number), **tags}
    run_id = start_run(client, experiment_id, f"trial-{number:04d}", run_tags, parent_run_id)
    log_params(client, run_id, {"trial": number})
    return run_id


def start_seed_run(client: MlflowClient, study: str, trial_run_id: str, number: int, seed: int) -> str:
    """One seed of a trial with repeats: a run `trial-0007-seed-3` nested under the trial's run."""
    experiment_id = ensure_experiment(client, study)
    tags = {STUDY_TAG: study, TRIAL_TAG: str(number), ROLE_TAG: SEED_ROLE}
    return start_run(client, experiment_id, f"trial-{number:04d}-seed-{seed}", tags, trial_run_id)


def running_trial_runs(client: MlflowClient, study: str) -> dict[int, str]:
    """Trial number -> id of each of the study's trial runs still RUNNING."""
    running = study_trial_runs(client, study, study, "attributes.status = 'RUNNING'")
    return {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in running if TRIAL_TAG in run.data.tags}


def running_seed_runs(client: MlflowClient, study: str) -> dict[int, list[str]]:
    """Trial number -> ids of the study's seed runs still RUNNING."""
    seeds: dict[int, list[str]] = {}
    for run in study_trial_runs(client, study, study, "attributes.status = 'RUNNING'", role=SEED_ROLE):
        seeds.setdefault(int(run.data.tags[TRIAL_TAG]), []).append(run.info.run_id)
    return seeds
