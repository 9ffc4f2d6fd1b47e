"""Throughput of the full D+Q and G step, and its FLOPs counted by torch."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.config import TrainConfig
from harness.train import InfoGANTrainer, resolve_device, seed_everything

WARMUP_STEPS = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def benchmark(batch_size: int, steps: int, device_name: str = "auto", seed: int = 0) -> dict[str, object]:
    """Median images/s over `steps` timed steps after warm-up, FLOPs per image and GFLOP/s."""
    seed_everything(seed)
    device = resolve_device(device_name)
    cfg = TrainConfig.model_validate({"optim": {"batch_size": batch_size}, "device": device_name, "seed": seed})
    trainer = InfoGANTrainer(cfg, device)
    real = torch.rand(batch_size, 1, 28, 28, device=device)  # (B, 1, 28, 28) in [0, 1]; content does not change cost

    with FlopCounterMode(display=False) as counter:
        trainer.step(real)
    flop_per_image = counter.get_total_flops() / batch_size

    for _ in range(WARMUP_STEPS):
        trainer.step(real)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        trainer.step(real)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    images_per_s = batch_size / statistics.median(seconds)
    return {
        "device": str(device),
        "batch_size": batch_size,
        "steps": steps,
        "images_per_s": round(images_per_s, 1),
        "gflop_per_image": round(flop_per_image / 1e9, 4),
        "gflop_per_s": round(images_per_s * flop_per_image / 1e9, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
