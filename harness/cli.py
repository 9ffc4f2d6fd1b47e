"""`harness` command line: thin wrappers over the library calls. Each command imports what it uses when it runs,
so that `--help`, `report`, `ui` and `server` start without torch (tests/test_cli_start.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar

import click

from harness import signals
from harness.errors import ConfigError


class HarnessGroup(click.Group):
    """Bad input exits 2 with one line on stderr, never a traceback; Ctrl-C and SIGTERM stop a command as
    it winds up after them, with exit code 128 + the signal's number."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as err:
            click.echo(signals.reason(err), err=True)
            sys.exit(signals.exit_code(err))


@click.group(cls=HarnessGroup)
def main() -> None:
    """Find, by sweeping, the InfoGAN settings that best disentangle MNIST."""
    if threading.current_thread() is threading.main_thread():
        signals.stop_signals_raise()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"


@main.command("train")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted config key.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (beats MLFLOW_TRACKING_URI).")
@click.option("--experiment", default="train", show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--resume", "resume_run", default=None, metavar="RUN_ID", help="Go on with this run from its latest checkpoint."
)
def train_command(
    config: Path | None,
    overrides: tuple[str, ...],
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    quiet: bool,
    resume_run: str | None,
) -> None:
    """Train one InfoGAN and log it to MLflow, or go on with a stopped run (--resume) in that run."""
    from harness import run_logging, tracking
    from harness.config import load_train_config
    from harness.progress import ProgressBar, progress_display
    from harness.train import train

    checkpoint, resumed = None, None
    if resume_run is None:
        cfg = load_train_config(config, overrides)  # bad input stops before the store is touched
        client = tracking.client_for(tracking_uri)
    elif config is not None or overrides:
        raise ConfigError("--resume", resume_run, "takes neither a config file nor --set: the run has its config")
    else:
        client = tracking.client_for(tracking_uri)
        cfg, checkpoint = run_logging.resume_point(client, resume_run)
        resumed = (resume_run, checkpoint["step"])
    with (
        run_logging.tracked_run(client, experiment, run_name, resumed=resumed) as run,
        progress_display(quiet) as progress,
    ):
        result = train(cfg, [run, ProgressBar(progress)], resume=checkpoint)
        run.log_weights(result.weights)
    summary = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("eval/")}
    click.echo(f"run {run.run_id} finished in {result.seconds:.0f}s on {result.info.device}: {json.dumps(summary)}")
    click.echo(f"MLflow store: {client.tracking_uri}")


@main.command("bench")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Timed steps after warm-up.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--pack",
    default=None,
    type=click.IntRange(min=1),
    help="InfoGANs trained as one fused model. [default: the device's default pack]",
)
@click.option(
    "--cuda-graph/--no-cuda-graph", default=True, show_default=True, help="On CUDA, replay the step as a CUDA graph."
)
def bench_command(batch_size: int, steps: int, device: str, pack: int | None, cuda_graph: bool) -> None:
    """Print one JSON line: images/s of a pack's full D+Q+G step (all members and per member), GFLOP per image,
    GFLOP/s and its share of a float32 matmul's rate, and paper-scale trials per hour."""
    from harness.bench import benchmark
    from harness.config import load_train_config

    load_train_config(None, (f"device={device}",))  # the same validation as train
    click.echo(json.dumps(benchmark(batch_size, steps, pack, device, cuda_graph=cuda_graph)))


@main.command("report")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--study", "study_name", default=None, help="Study name (beats the file's `name`).")
@click.option("--storage", default=None, help="Optuna storage URL (beats the file's).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (beats the file's and MLFLOW_TRACKING_URI).")
@click.option("-o", "--output", default=None, metavar="FILE", help="Table file, - for stdout. [default: <study>.csv]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "markdown", "json"]),
    default=None,
    help="Table format. [default: from FILE's suffix (.md, .json), else csv]",
)
@click.option(
    "--plots",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Also write Optuna's plots (HTML, offline, and PNG), the best trials' traversals and every trial's "
    "objective curve here, and log them to the study's parent run.",
)
def report_command(
    study_file: Path,
    study_name: str | None,
    storage: str | None,
    tracking_uri: str | None,
    output: str | None,
    fmt: str | None,
    plots: Path | None,
) -> None:
    """One row per trial, joined from Optuna and MLflow, best first; a summary on the terminal."""
    from rich.console import Console

    from harness import report
    from harness.sweep.plots import write_plots

    loaded = report.load_report(study_file, study_name, storage, tracking_uri)
    table_format = report.format_for(output, fmt)
    console = Console(stderr=output == "-", soft_wrap=True)  # stdout carries the table
    report.summary(loaded.table, loaded.study, loaded.objectives, console)
    text = report.render(loaded.table, table_format)
    if output == "-":
        click.echo(text, nl=False)
    else:
        path = Path(output or loaded.name + report.SUFFIXES[table_format])
        path.write_text(text, encoding="utf-8")
        console.print(f"wrote {len(loaded.table)} trials to {path}")
    if plots is not None:
        paths = write_plots(loaded.study, loaded.objectives, plots) + report.write_pictures(loaded, plots)
        parent = report.log_plots(loaded.client, loaded.runs, paths)
        logged = f"logged to run {parent}" if parent else "no parent run in MLflow to log them to"
        console.print(f"wrote {len(paths)} plots to {plots}/; {logged}")


class Served(Protocol):
    """A running server: UiServer, TrackingServer."""

    @property
    def process(self) -> subprocess.Popen[bytes]: ...


S = TypeVar("S", bound=Served)


def serve_until_stopped(serving: AbstractContextManager[S], announce: Callable[[S], None]) -> None:
    """Run an `mlflow server` until Ctrl-C or SIGTERM (then stopped, exit 0) or its own exit (1 if it failed)."""
    try:
        with serving as served:
            announce(served)
            code = served.process.wait()
    except KeyboardInterrupt:
        return  # Ctrl-C or SIGTERM, at any moment: the server stopped as the block ended
    if code:
        click.echo(f"error: mlflow server exited with code {code}", err=True)
        sys.exit(1)


@main.command("ui")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (beats MLFLOW_TRACKING_URI).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui_command(tracking_uri: str | None, host: str, port: int) -> None:
    """Serve the MLflow UI over the project's store until Ctrl-C."""
    from harness import server, tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)

    def announce(ui: server.UiServer) -> None:
        click.echo(f"MLflow UI over {uri} at {ui.url} (Ctrl-C stops it)")
        for links in server.experiment_links(tracking.client_for(uri), ui.url):
            click.echo(f"  {links.name}: runs {links.runs}")
            if links.compare:
                click.echo(f"  {links.name}: compare trials {links.compare}")

    serve_until_stopped(server.serve_ui(uri, host, port), announce)


@main.command("server")
@click.option(
    "--store", default=None, help="Its database: sqlite:///… or postgresql+psycopg2://… [default: the project's]"
)
@click.option(
    "--artifacts",
    default="mlruns/artifacts",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder the server keeps every run's artifacts in.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Server processes.")
@click.option("--insecure", is_flag=True, help="Serve beyond loopback without authentication.")
def server_command(store: str | None, artifacts: Path, host: str, port: int, workers: int, insecure: bool) -> None:
    """Serve the tracking store and its artifacts to workers on other hosts until Ctrl-C."""
    from harness import server, tracking
    from harness.urls import display_url

    uri = tracking.resolve_tracking_uri(store or tracking.DEFAULT_TRACKING_URI)

    def announce(served: server.TrackingServer) -> None:
        where = f"MLflow tracking server over {display_url(uri)} at {served.url}, artifacts in {artifacts}"
        click.echo(f"{where} (Ctrl-C stops it)")
        login = f", with {server.USERNAME_VAR} and {server.PASSWORD_VAR} set" if served.credentials else ""
        click.echo(f"workers: harness sweep STUDY.yaml --tracking-uri {served.tracking_uri}{login}")

    serve_until_stopped(server.serve_tracking(uri, artifacts.resolve(), host, port, workers, insecure), announce)


@main.command("sweep")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Finished trials to reach (beats the file).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--storage", default=None, help="Optuna storage URL (beats the file).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (beats the file and MLFLOW_TRACKING_URI).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (beats the file's train.device).")
@click.option(
    "--pack",
    type=click.IntRange(min=1),
    default=None,
    help="Trials a worker trains as one fused model (beats the file's pack). [default: the device's]",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a dotted study-file key.")
def sweep_command(
    study_file: Path,
    trials: int | None,
    workers: int,
    storage: str | None,
    tracking_uri: str | None,
    device: str | None,
    pack: int | None,
    overrides: tuple[str, ...],
) -> None:
    """Run or resume an Optuna study: one MLflow parent run, a child run per trial."""
    from rich.console import Console

    from harness.sweep.coordinator import run_sweep
    from harness.sweep.spec import load_study_spec

    flags = (f"pack={pack}",) if pack is not None else ()
    spec = load_study_spec(study_file, trials, storage, tracking_uri, device, (*overrides, *flags))
    sys.exit(run_sweep(spec, study_file, workers, Console()))


@main.command("sweep-worker", hidden=True)
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--worker", type=int, required=True)
@click.option("--status-dir", type=click.Path(path_type=Path), required=True)
@click.option("--parent-pid", type=int, required=True)
def sweep_worker_command(spec_file: Path, worker: int, status_dir: Path, parent_pid: int) -> None:
    """One worker process of `harness sweep --workers N`, started by it with its validated spec."""
    from harness.sweep.workers import run_worker

    sys.exit(run_worker(spec_file, worker, status_dir, parent_pid))


if __name__ == "__main__":
    main()
