"""`harness train`'s progress bar: a train listener drawing step, losses and the last eval/cat_acc."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import TrainConfig
from harness.evaluate import Evaluation
from harness.train import RunInfo, TrainListener


class ProgressBar(TrainListener):
    """One bar: step, losses and the last eval/cat_acc."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("train", total=None, status="")
        self.cat_acc = "-"

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None:
        self.progress.update(self.task, total=cfg.steps, description=f"train on {info.device} ({info.data_source})")

    def on_log(self, step: int, values: dict[str, float]) -> None:
        status = (
            f"D {values['loss/d']:.3f}  G {values['loss/g']:.3f}  info {values['loss/info']:.3f}  acc {self.cat_acc}"
        )
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
