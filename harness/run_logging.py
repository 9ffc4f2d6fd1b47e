"""A training run's MLflow run: its config and set-up when it starts, its metrics, traversal grids and checkpoints as
it trains (`RunLogger`, a train listener), its weights, and its end (`tracked_run`)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from harness import signals
from harness.checkpoint import CheckpointError, check_checkpoint
from harness.config import TrainConfig, load_train_config
from harness.errors import ConfigError
from harness.evaluate import Evaluation
from harness.seeding import initial_model
from harness.tracking import (
    ERROR_TAG,
    RESUMED_AT_TAG,
    config_params,
    end_run,
    ensure_experiment,
    log_metrics,
    log_params,
    start_run,
)
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

    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None:
        save_checkpoint(self.client, self.run_id, step, checkpoint)

    def log_weights(self, weights: Mapping[str, object]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "weights.pt"
            torch.save(dict(weights), path)
            self.client.log_artifact(self.run_id, str(path), artifact_path="model")


CHECKPOINTS = "checkpoints"  # a run's artifact folder: step-NNNNNNNNN.pt files and latest.json, which names one
LATEST = f"{CHECKPOINTS}/latest.json"


def save_checkpoint(client: MlflowClient, run_id: str, step: int, checkpoint: dict[str, Any]) -> None:
    """Upload the checkpoint as a new file, then point `latest.json` at it (with its SHA-256), then delete the
    older files where the artifact store allows it: a kill at any moment leaves the previous latest whole."""
    name = f"step-{step:09d}.pt"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        torch.save(checkpoint, path)
        pointer = {"step": step, "file": name, "sha256": file_digest(path), "bytes": path.stat().st_size}
        client.log_artifact(run_id, str(path), artifact_path=CHECKPOINTS)
    client.log_text(run_id, json.dumps(pointer), LATEST)
    for older in client.list_artifacts(run_id, CHECKPOINTS):
        if (
            older.path.endswith(".pt")
            and Path(older.path).name != name
            and not delete_artifacts(client, run_id, older.path)
        ):
            break


def delete_artifacts(client: MlflowClient, run_id: str, path: str) -> bool:
    """Delete a run's artifact file or folder; False where the artifact store cannot delete."""
    repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri, client.tracking_uri)
    try:
        repository.delete_artifacts(path)
    except (MlflowException, NotImplementedError, OSError):
        return False
    return True


def file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_checkpoint(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    """The run's latest checkpoint; None where it saved none. CheckpointError: one that cannot be read whole."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            pointer = json.loads(Path(client.download_artifacts(run_id, LATEST, folder)).read_text(encoding="utf-8"))
        except MlflowException:
            return None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"its {LATEST} is unreadable: {err}") from None
        try:
            path = Path(client.download_artifacts(run_id, f"{CHECKPOINTS}/{pointer['file']}", folder))
        except (MlflowException, KeyError, TypeError) as err:
            raise CheckpointError(f"the checkpoint {LATEST} names is missing: {err}") from None
        if file_digest(path) != pointer["sha256"]:
            raise CheckpointError(f"{pointer['file']} is corrupt (its SHA-256 is not the one recorded)")
        try:
            checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling error of any kind: the file is not a checkpoint we can use
            raise CheckpointError(f"{pointer['file']} does not load: {type(err).__name__}: {err}") from None
    return checkpoint


def resume_point(client: MlflowClient, run_id: str) -> tuple[TrainConfig, dict[str, Any]]:
    """A run's config (its `config.yaml`) and latest checkpoint, checked; ConfigError (`--resume`) says why not."""
    try:
        client.get_run(run_id)
        with tempfile.TemporaryDirectory() as folder:
            cfg = load_train_config(Path(client.download_artifacts(run_id, "config.yaml", folder)))
        checkpoint = load_checkpoint(client, run_id)
        if checkpoint is None:
            raise CheckpointError("it saved no checkpoint")
        check_checkpoint(checkpoint, cfg, initial_model(cfg, torch.device("cpu")).state_dict())
    except (MlflowException, CheckpointError, ConfigError) as err:
        raise ConfigError("--resume", run_id, f"cannot go on with this run: {err}") from None
    return cfg, checkpoint


@contextmanager
def tracked_run(
    client: MlflowClient,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    resumed: tuple[str, int] | None = None,
) -> Iterator[RunLogger]:
    """A run that ends FINISHED, FAILED (error as tag `error`) or KILLED on Ctrl-C or SIGTERM: a new one, or
    `resumed` (run id, step): that run, RUNNING again, tagged with the step it goes on from."""
    if resumed is None:
        run_id = start_run(client, ensure_experiment(client, experiment), run_name or "train", tags, parent_run_id)
    else:
        run_id, step = resumed
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        client.set_tag(run_id, RESUMED_AT_TAG, str(step))
    try:
        yield RunLogger(client, run_id)
    except KeyboardInterrupt as err:
        end_run(client, run_id, RunStatus.to_string(RunStatus.KILLED), {ERROR_TAG: signals.reason(err)})
        raise
    except BaseException as err:
        end_run(client, run_id, RunStatus.to_string(RunStatus.FAILED), {ERROR_TAG: f"{type(err).__name__}: {err}"})
        raise
    else:
        delete_artifacts(client, run_id, CHECKPOINTS)  # a finished run has its weights; 160 MB a checkpoint
        end_run(client, run_id, RunStatus.to_string(RunStatus.FINISHED))
