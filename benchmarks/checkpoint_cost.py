"""What a checkpoint costs: its size, the time to save it into a real MLflow store (SQLite, local artifacts) and to
load it back, and its share of a trial at the default schedule (a checkpoint at each evaluation: 9 in 5,000 steps),
against the step time measured in the same process.

    .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness import run_logging, tracking
from harness.checkpoint import check_checkpoint, member_checkpoint
from harness.config import load_train_config
from harness.data import bundled_mnist_folder, read_split_folder
from harness.pack import PackTrainer
from harness.seeding import initial_model

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps timed for the step time")
    args = parser.parse_args()
    cfg = load_train_config(None, ("device=cpu",))  # the defaults: batch 128, 5,000 steps, an evaluation every 500
    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    pack = PackTrainer([cfg], [initial_model(cfg, CPU)], data.train_images, CPU)
    pack.step()
    began = time.perf_counter()
    for _ in range(args.steps):
        pack.step()
    step_s = (time.perf_counter() - began) / args.steps

    with tempfile.TemporaryDirectory() as folder:
        client = tracking.client_for(f"sqlite:///{Path(folder) / 'mlflow.db'}")
        with run_logging.tracked_run(client, "checkpoint-cost", "cost") as run:
            saves, loads = [], []
            for repeat in range(args.repeats):
                began = time.perf_counter()
                checkpoint = member_checkpoint(cfg, 500 * (repeat + 1), pack.member_checkpoint(0), None, 0, {})
                run.on_checkpoint(checkpoint["step"], checkpoint)
                saves.append(time.perf_counter() - began)
                began = time.perf_counter()
                loaded = run_logging.load_checkpoint(client, run.run_id)
                assert loaded is not None
                check_checkpoint(loaded, cfg, initial_model(cfg, CPU).state_dict())
                loads.append(time.perf_counter() - began)
            (artifact,) = [a for a in client.list_artifacts(run.run_id, "checkpoints") if a.path.endswith(".pt")]
    checkpoints = len(range(cfg.eval_every, cfg.steps, cfg.eval_every))
    trial_s = cfg.steps * step_s
    result = {
        "checkpoint_mb": round((artifact.file_size or 0) / 1e6, 1),
        "save_s": round(statistics.median(saves), 2),
        "load_s": round(statistics.median(loads), 2),
        "step_s": round(step_s, 3),
        "checkpoints_a_trial": checkpoints,
        "share_of_trial": round(checkpoints * statistics.median(saves) / trial_s, 4),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
