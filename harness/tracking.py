"""Every MLflow call of the project: stores, experiments, runs, metrics and artifacts."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from harness.config import TrainConfig, flatten
from harness.train import Evaluation, RunInfo, TrainListener

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # opens the runs table rather than the GenAI overview
BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`--tracking-uri` beats MLFLOW_TRACKING_URI beats the project's SQLite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())  # independent of later cwd
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a SQLite store: `<db folder>/artifacts/<experiment>`; elsewhere the server decides."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / folder).as_uri()


def client_for(uri: str | None) -> MlflowClient:
    uri = resolve_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created with the model-development kind if it is new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    return client.create_experiment(
        name,
        artifact_location=artifact_location(client.tracking_uri, name),
        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
    )


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


class RunLogger(TrainListener):
    """Streams one training run into an MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None:
        log_params(self.client, self.run_id, config_params(cfg))
        tags = {
            "data.source": info.data_source,
            "data.location": info.data_location,
            "data.size": f"{info.train_images} train / {info.test_images} test",
            "device": info.device,
            "torch.version": torch.__version__,
        }
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_text(self.run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")

    def on_log(self, step: int, values: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, step, values)

    def on_eval(self, evaluation: Evaluation) -> None:
        log_metrics(self.client, self.run_id, evaluation.step, evaluation.metrics)
        for name, image in evaluation.images.items():
            self.client.log_image(self.run_id, image, artifact_file=f"traversals/step-{evaluation.step:06d}/{name}.png")

    def log_weights(self, weights: Mapping[str, object]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "weights.pt"
            torch.save(dict(weights), path)
            self.client.log_artifact(self.run_id, str(path), artifact_path="model")


@contextmanager
def tracked_run(
    client: MlflowClient,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """A run that ends FINISHED, FAILED (error as tag `error`) or KILLED on Ctrl-C."""
    experiment_id = ensure_experiment(client, experiment)
    run_id = start_run(client, experiment_id, run_name or "train", tags, parent_run_id)
    try:
        yield RunLogger(client, run_id)
    except KeyboardInterrupt:
        end_run(client, run_id, RunStatus.to_string(RunStatus.KILLED), {"error": "interrupted"})
        raise
    except BaseException as err:
        end_run(client, run_id, RunStatus.to_string(RunStatus.FAILED), {"error": f"{type(err).__name__}: {err}"})
        raise
    else:
        end_run(client, run_id, RunStatus.to_string(RunStatus.FINISHED))


def runs_url(uri: str, experiment_id: str) -> str:
    """Where the runs table of an experiment lives in the MLflow UI (not the GenAI overview)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
