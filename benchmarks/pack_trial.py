"""Wall time of paper-scale trials trained as one pack: `harness.train.train_pack` on P independent trials.

    .venv/bin/python benchmarks/pack_trial.py --pack 16 [--steps 5000] [--batch-size 128] [--eval-every 1000]
        [--device auto] [--out FILE]

P groups of one member each (seeds 0..P-1, the default config otherwise: what a sweep's pack of P trials
trains), on the data `harness train` uses (the bundled subset where no download is found), with evaluations
as configured. Prints (and writes to --out) one JSON line: the wall time of the whole `train_pack` call, its
training time (the log windows' time, evaluations excluded, as `perf/images_per_s` counts it), the time spent
evaluating and the rest (loading data, building the pack), images/s of all members together, and trials/hour.
Needs no MLflow or Optuna: only torch and the harness' own modules (and pydantic, which its config uses).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from harness.config import TrainConfig, load_train_config
from harness.evaluate import Evaluation
from harness.train import Group, GroupListener, RunInfo, train_pack


class Clock(GroupListener):
    """Sums a group's training seconds from its log windows (each window's steps over its images/s)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.last_step, self.train_s = batch_size, 0, 0.0
        self.evaluations = 0
        self.device = ""
        self.final: dict[str, float] = {}

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None:
        self.device = info.device

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None:
        images_per_s = values[0]["perf/images_per_s"]  # one member's images/s: the pack's step rate x batch
        self.train_s += (step - self.last_step) * self.batch_size / images_per_s
        self.last_step = step

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None:
        self.evaluations += 1
        self.final = {k: v for k, v in evaluations[0].metrics.items() if k in ("eval/cat_acc", "eval/fld")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=int, default=1, help="trials trained as one fused model")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    overrides = (
        f"steps={args.steps}",
        f"eval_every={args.eval_every}",
        f"log_every={args.log_every}",
        f"optim.batch_size={args.batch_size}",
        f"device={args.device}",
        "data.download=false",
    )
    configs = [load_train_config(None, (*overrides, f"seed={seed}")) for seed in range(args.pack)]
    clock = Clock(args.batch_size)
    groups = [Group([cfg], [[]], [clock] if seed == 0 else []) for seed, cfg in enumerate(configs)]
    started = time.perf_counter()
    outcomes = train_pack(groups)
    wall_s = time.perf_counter() - started
    errors = [repr(o.error) for o in outcomes if o.error is not None]
    # Every evaluation of every member is timed together: the time around the windows that is not training.
    images = args.pack * args.steps * args.batch_size
    row: dict[str, object] = {
        "device": clock.device,
        "pack": args.pack,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "evaluations_per_member": clock.evaluations,
        "wall_s": round(wall_s, 1),
        "train_s": round(clock.train_s, 1),
        "outside_train_s": round(wall_s - clock.train_s, 1),  # evaluations, data loading, building the pack
        "images_per_s_training": round(images / clock.train_s, 1) if clock.train_s else None,
        "trials_per_hour_wall": round(args.pack * 3600 / wall_s, 2),
        "seconds_per_trial_wall": round(wall_s / args.pack, 1),
        "member0_final": {k: round(v, 4) for k, v in clock.final.items()},
        "errors": errors,
        "torch": torch.__version__,
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")
    if errors:
        raise SystemExit(f"{len(errors)} of {args.pack} trials stopped: {errors[0]}")


if __name__ == "__main__":
    main()
