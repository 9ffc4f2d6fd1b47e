"""The live display of a sweep: trials finished of the total, the best so far, each running trial."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from harness.config import TrainConfig
from harness.evaluate import Evaluation
from harness.sweep.bookkeeping import (
    ERROR_ATTR,
    RETRY_ATTR,
    SURPLUS_ATTR,
    counted,
    lost_reason,
)
from harness.sweep.outage import StorageUnavailable
from harness.sweep.seeds import aggregate_metrics
from harness.sweep.spec import (
    Aggregate,
    StudySpec,
)
from harness.sweep.study import Sweep
from harness.text import format_value
from harness.train import GroupListener, RunInfo

SHOWN_METRICS = ("loss/d", "loss/g")  # besides the objectives, in the live display
PROGRESS_PREFIX = "progress-"  # <status dir>/progress-<pid>-<trial>.json: a running trial of a worker
READ_TRIALS_EVERY_S = 2.0


class TrialProgress(GroupListener):
    """Writes the running trial's step and last metrics (aggregated across its seeds) to a JSON file the live
    display reads, then calls `tick` (the in-process display's chance to redraw)."""

    def __init__(self, path: Path, number: int, shown: Sequence[str], how: Aggregate, tick: Callable[[], None]) -> None:
        self.path, self.shown, self.how, self.tick = path, tuple(shown), how, tick
        self.state: dict[str, Any] = {"trial": number, "step": 0, "steps": None, "metrics": {}}

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None:
        self.state["steps"] = configs[0].steps
        self.write()

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None:
        self.state["step"] = step
        self.show(values)

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None:
        self.show([evaluation.metrics for evaluation in evaluations])

    def show(self, per_seed: Sequence[dict[str, float]]) -> None:
        shown = [{k: v for k, v in values.items() if k in self.shown} for values in per_seed]
        self.state["metrics"].update(aggregate_metrics(shown, self.how))
        self.write()

    def write(self) -> None:
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps(self.state), encoding="utf-8")
        partial.replace(self.path)
        self.tick()


def progress_watchers(
    spec: StudySpec, status_dir: Path, tick: Callable[[], None]
) -> Callable[[int], list[GroupListener]]:
    """A trial's display listeners, by trial number: its progress file, then `tick`."""
    shown = [*(objective.metric for objective in spec.objective_list), *SHOWN_METRICS]
    prefix = f"{PROGRESS_PREFIX}{os.getpid()}"
    return lambda number: [TrialProgress(status_dir / f"{prefix}-{number}.json", number, shown, spec.aggregate, tick)]


class Monitor:
    """The live display: trials finished of the total, the best value so far, and each running trial's
    step and last metrics; a line for each trial as it ends."""

    def __init__(self, sweep: Sweep, status_dir: Path, console: Console) -> None:
        self.sweep, self.status_dir, self.console = sweep, status_dir, console
        self.trials = sweep.study.get_trials(deepcopy=False)
        self.announced = {t.number for t in self.trials if t.state.is_finished()}
        self.read_at = time.monotonic()
        self.started = time.monotonic()
        self.live = Live(console=console, auto_refresh=False, transient=True)  # the summary lines stay

    def __enter__(self) -> Monitor:
        done = counted(self.trials)
        if done:
            say(self.console, f"resuming study {self.sweep.spec.name}: {len(done)}/{self.sweep.spec.trials} finished")
        self.live.start()
        self.live.update(self.render(), refresh=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if not isinstance(error, StorageUnavailable):  # else there is nothing to read
            self.poll(force=True)
        self.live.stop()

    def poll(self, force: bool = False) -> None:
        """Re-read the study now and then, announce the trials that ended, redraw."""
        if force or time.monotonic() - self.read_at >= READ_TRIALS_EVERY_S:
            self.trials = self.sweep.study.get_trials(deepcopy=False)
            self.read_at = time.monotonic()
            for trial in self.trials:
                if trial.state.is_finished() and trial.number not in self.announced:
                    self.announced.add(trial.number)
                    line = self.describe(trial)
                    if line:
                        say(self.console, line)
        self.live.update(self.render(), refresh=True)

    def describe(self, trial: FrozenTrial) -> str | None:
        """One line on how a trial ended; None for a surplus trial, which never ran."""
        if trial.user_attrs.get(SURPLUS_ATTR):
            return None
        retries = {t.user_attrs[RETRY_ATTR]: t for t in self.trials if RETRY_ATTR in t.user_attrs}
        params = "  ".join(f"{k}={format_value(v)}" for k, v in trial.params.items())
        if trial.number in retries:
            return f"trial {trial.number} LOST ({lost_reason(trial, retries[trial.number])})"
        if trial.state == TrialState.COMPLETE:
            values = "  ".join(f"{m}={format_value(v)}" for m, v in zip(self.metrics, trial.values or (), strict=False))
            return f"trial {trial.number} COMPLETE  {values}  {params}"
        if trial.state == TrialState.PRUNED:
            return f"trial {trial.number} PRUNED at evaluation {trial.last_step}  {params}"
        return f"trial {trial.number} FAIL  {trial.user_attrs.get(ERROR_ATTR, '')}  {params}"

    @property
    def metrics(self) -> list[str]:
        """The objectives' metric names."""
        return [objective.metric for objective in self.sweep.spec.objective_list]

    def running(self) -> list[dict[str, Any]]:
        """The progress of each running trial with a worker on this machine."""
        states = []
        for path in sorted(self.status_dir.glob(f"{PROGRESS_PREFIX}*.json")):
            try:
                states.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # replaced or removed while reading
        live = {t.number for t in self.trials if t.state == TrialState.RUNNING}
        return [state for state in states if state["trial"] in live]

    def render(self) -> RenderableType:
        """A line with finished of total and the best so far, then a row per running trial."""
        spec = self.sweep.spec
        done = counted(self.trials)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.started))
        title = Text(f"study {spec.name}: {len(done)}/{spec.trials} finished, {best_text(spec, self.trials)} {elapsed}")
        running = self.running()
        if not running:
            return title
        shown = [*self.metrics, *SHOWN_METRICS]
        table = Table()
        for column in ("trial", "step", *shown):
            table.add_column(column, justify="right")
        for state in running:
            step = f"{state['step']}/{state['steps']}" if state["steps"] else "starting"
            values = [format_value(state["metrics"][m]) if m in state["metrics"] else "-" for m in shown]
            table.add_row(str(state["trial"]), step, *values)
        return Group(title, table)


def say(console: Console, line: str) -> None:
    """Print a line as is: no markup, no colouring, no wrapping."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def best_text(spec: StudySpec, trials: Sequence[FrozenTrial]) -> str:
    """The best value so far, from trials already read (a redraw queries nothing)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not complete:
        return "no trial complete yet"
    if spec.multi_objective:
        return f"{len(complete)} complete"
    sign = 1.0 if spec.objective_list[0].direction == "maximize" else -1.0
    best = max(complete, key=lambda t: sign * (t.values or [0.0])[0])
    return f"best {spec.objective_list[0].metric} {format_value(best.value)} (trial {best.number})"
