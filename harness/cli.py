"""`harness` command line: thin wrappers over the library calls."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import ConfigError, TrainConfig, load_train_config
from harness.train import Evaluation, RunInfo, TrainListener, train


class ProgressBar(TrainListener):
    """One bar: step, losses and the last eval/cat_acc."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("train", total=None, status="")
        self.cat_acc = "-"

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None:
        self.progress.update(self.task, total=cfg.steps, description=f"train on {info.device} ({info.data_source})")

    def on_log(self, step: int, values: dict[str, float]) -> None:
        status = f"D {values['loss/d']:.3f}  G {values['loss/g']:.3f}  info {values['loss/info']:.3f}  acc {self.cat_acc}"
        self.progress.update(self.task, completed=step, status=status)

    def on_eval(self, evaluation: Evaluation) -> None:
        if "eval/cat_acc" in evaluation.metrics:
            self.cat_acc = f"{evaluation.metrics['eval/cat_acc']:.3f}"


def progress_display(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
    )


class HarnessGroup(click.Group):
    """Bad input exits 2 with one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=HarnessGroup)
def main() -> None:
    """Find, by sweeping, the InfoGAN settings that best disentangle MNIST."""
    warnings.filterwarnings("ignore", category=FutureWarning)


@main.command("train")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted config key.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (beats MLFLOW_TRACKING_URI).")
@click.option("--experiment", default="train", show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(
    config: Path | None,
    overrides: tuple[str, ...],
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    quiet: bool,
) -> None:
    """Train one InfoGAN and log it to MLflow."""
    from harness import tracking

    cfg = load_train_config(config, overrides)
    client = tracking.client_for(tracking_uri)
    with tracking.tracked_run(client, experiment, run_name) as run, progress_display(quiet) as progress:
        result = train(cfg, [run, ProgressBar(progress)])
        run.log_weights(result.weights)
    summary = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("eval/")}
    click.echo(f"run {run.run_id} finished in {result.seconds:.0f}s on {result.info.device}: {json.dumps(summary)}")
    click.echo(f"MLflow store: {client.tracking_uri}")
