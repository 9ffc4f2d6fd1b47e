"""eval/cat_acc against wall time for one config on this machine.

    .venv/bin/python benchmarks/accuracy_vs_time.py --minutes 10 --out benchmarks/results/default-cpu.csv \
        [--set KEY=VALUE ...]

Trains with `harness.train.train`, evaluating every `eval_every` steps, and stops at the first
evaluation past the time budget. Evaluation time is included in the wall time.
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

import click

from harness.config import load_train_config
from harness.evaluate import Evaluation
from harness.train import TrainListener, train


class BudgetReached(Exception):
    """The time budget is spent."""


class Curve(TrainListener):
    def __init__(self, budget_s: float, batch_size: int) -> None:
        self.start = time.perf_counter()
        self.budget_s, self.batch_size = budget_s, batch_size
        self.rows: list[dict[str, float]] = []

    def on_eval(self, evaluation: Evaluation) -> None:
        seconds = time.perf_counter() - self.start
        row = {"seconds": round(seconds, 1), "step": evaluation.step, "images": evaluation.step * self.batch_size}
        row.update({k: round(v, 4) for k, v in evaluation.metrics.items()})
        self.rows.append(row)
        click.echo(" ".join(f"{k}={v}" for k, v in row.items()))
        if seconds > self.budget_s:
            raise BudgetReached


@click.command()
@click.option("--minutes", default=10.0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def main(minutes: float, out: Path, overrides: tuple[str, ...]) -> None:
    cfg = load_train_config(None, ("steps=1000000", "eval_every=250", "data.download=false", *overrides))
    curve = Curve(minutes * 60, cfg.optim.batch_size)
    with contextlib.suppress(BudgetReached):
        train(cfg, [curve])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve.rows[0]))
        writer.writeheader()
        writer.writerows(curve.rows)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
