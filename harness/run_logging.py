"""A training run's MLflow run: its config and set-up when it starts, its metrics and traversal grids as it trains
(`RunLogger`, a train listener), its weights, and its end (`tracked_run`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from mlflow.entities import RunStatus, RunTag
from mlflow.tracking import MlflowClient

from harness import signals
from harness.config import TrainConfig
from harness.evaluate import Evaluation
from harness.tracking import ERROR_TAG, config_params, end_run, ensure_experiment, log_metrics, log_params, start_run
from harness.train import RunInfo, TrainListener


def log_run_start(client: MlflowClient, run_id: str, info: RunInfo, cfg: TrainConfig) -> None:
    """The resolved config as params and as `config.yaml`, and where the run trains on what data, as tags."""
    log_params(client, run_id, config_params(cfg))
    tags = {
        "data.source": info.data_source,
        "data.location": info.data_location,
        "data.size": f"{info.train_images} train / {info.test_images} test",
        "device": info.device,
        "torch.version": torch.__version__,
    }
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")


class RunLogger(TrainListener):
    """Streams one training run into an MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None:
        log_run_start(self.client, self.run_id, info, cfg)

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
    """A run that ends FINISHED, FAILED (error as tag `error`) or KILLED on Ctrl-C or SIGTERM."""
    experiment_id = ensure_experiment(client, experiment)
    run_id = start_run(client, experiment_id, run_name or "train", tags, parent_run_id)
    try:
        yield RunLogger(client, run_id)
    except KeyboardInterrupt as err:
        end_run(client, run_id, RunStatus.to_string(RunStatus.KILLED), {ERROR_TAG: signals.reason(err)})
        raise
    except BaseException as err:
        end_run(client, run_id, RunStatus.to_string(RunStatus.FAILED), {ERROR_TAG: f"{type(err).__name__}: {err}"})
        raise
    else:
        end_run(client, run_id, RunStatus.to_string(RunStatus.FINISHED))
