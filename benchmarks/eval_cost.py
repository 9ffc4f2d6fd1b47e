"""What evaluation costs, as a share of a trial, at each study's `eval_every`.

    .venv/bin/python benchmarks/eval_cost.py [--repeats 5] [--steps 20]

For each study file in studies/ (its `train:` section over the trainer's defaults, on this machine's
device): the median seconds of one training step at the study's batch size, of one evaluation (every
metric: categorical accuracy, the continuous codes' ρ, Fréchet distance and purity, traversal grids), and
of the set-up (once per run: the held-out digits' properties and classifier features, the fixed latents). The
share is evaluation / (eval_every steps + evaluation): what a trial spends evaluating. One JSON line per
study. Weights are as initialised: the cost of a step or an evaluation does not depend on what they hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from harness.data import load_dataset
from harness.device import resolve_device
from harness.evaluate import Evaluator, HeldOut
from harness.pack import PackTrainer
from harness.seeding import initial_model
from harness.sweep.spec import load_study_spec

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: first-call allocations
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="evaluations timed per study")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per study")
    args = parser.parse_args()
    for path in sorted(STUDIES.glob("*.yaml")):
        cfg = load_study_spec(path).train.model_copy(update={"device": "auto"})
        device = resolve_device(cfg.device)
        data = load_dataset(cfg.data.model_copy(update={"download": False})).to(device)
        model = initial_model(cfg, device)
        trainer = PackTrainer([cfg], [model], data.train_images, device)  # a pack of one: one trial
        started = time.perf_counter()
        held_out = HeldOut(data, device, with_properties=cfg.codes.continuous > 0)
        evaluate = Evaluator(trainer.spec, held_out, cfg.seed, device)
        setup = time.perf_counter() - started
        step = median_seconds(trainer.step, args.steps)
        evaluation = median_seconds(partial(evaluate, model, 0), args.repeats)
        window = cfg.eval_every * step
        result = {
            "study": path.stem,
            "device": str(device),
            "batch_size": cfg.optim.batch_size,
            "eval_every": cfg.eval_every,
            "step_s": round(step, 4),
            "evaluation_s": round(evaluation, 3),
            "evaluator_setup_s": round(setup, 2),
            "eval_share": round(evaluation / (window + evaluation), 4),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
