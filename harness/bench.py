"""Throughput of a pack's full D+Q and G step, its FLOPs counted by torch, against the same run's matmul rate."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.config import TrainConfig
from harness.device import default_pack, resolve_device
from harness.pack import PackTrainer
from harness.seeding import initial_model

WARMUP_STEPS = 5  # on CUDA these include the eager steps before the graph is captured
CHUNK = 5  # steps timed together, between device synchronisations
IMAGES = 4096  # stand-in training images: their content does not change the cost
PAPER_TRIAL_IMAGES = 5000 * 128  # the official MNIST run: 5,000 steps at batch 128


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_gflop_per_s(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """The best rate of a large square matmul on `device`: the machine's practical ceiling for the step."""
    n = 2048 if device.type == "cpu" else 8192
    generator = torch.Generator(device).manual_seed(0)
    a = torch.rand(n, n, generator=generator, device=device).to(dtype)
    b = torch.rand(n, n, generator=generator, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def benchmark(
    batch_size: int,
    steps: int,
    pack: int | None = None,
    device_name: str = "auto",
    seed: int = 0,
    cuda_graph: bool = True,
) -> dict[str, object]:
    """A pack of `pack` members (seeds `seed`, `seed + 1`, ...; default: the device's default pack): images/s
    of all members together and per member (median over chunks of CHUNK steps after warm-up), FLOPs per image,
    GFLOP/s and their share of a float32 matmul's rate measured in the same run, and paper-scale trials/hour."""
    device = resolve_device(device_name)
    members = pack if pack is not None else default_pack(device)
    configs = [
        TrainConfig.model_validate({"optim": {"batch_size": batch_size}, "device": device_name, "seed": seed + k})
        for k in range(members)
    ]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (IMAGES, 28, 28), dtype=torch.uint8, generator=generator).to(device)
    # Counted on a pack of one, the same arithmetic per image: torch's counter takes a grouped convolution's
    # weight gradient for an ungrouped one, P times the work it is.
    with FlopCounterMode(display=False) as counter:
        PackTrainer(configs[:1], [initial_model(configs[0], device)], images, device, cuda_graph=False).step()
    flop_per_image = counter.get_total_flops() / batch_size
    trainer = PackTrainer(configs, [initial_model(cfg, device) for cfg in configs], images, device, cuda_graph)
    for _ in range(WARMUP_STEPS):
        trainer.step()
    seconds = []
    for _ in range(max(1, steps // CHUNK)):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(CHUNK):
            trainer.step()
        synchronize(device)
        seconds.append((time.perf_counter() - start) / CHUNK)
    images_per_s = members * batch_size / statistics.median(seconds)
    gflop_per_s = images_per_s * flop_per_image / 1e9
    matmul = matmul_gflop_per_s(device)
    result: dict[str, object] = {
        "device": str(device),
        "pack": members,
        "batch_size": batch_size,
        "steps": CHUNK * len(seconds),
        "images_per_s": round(images_per_s, 1),
        "images_per_s_per_member": round(images_per_s / members, 1),
        "gflop_per_image": round(flop_per_image / 1e9, 4),
        "gflop_per_s": round(gflop_per_s, 1),
        "matmul_gflop_per_s": round(matmul, 1),
        "matmul_share": round(gflop_per_s / matmul, 3),
        "paper_trials_per_hour": round(images_per_s * 3600 / PAPER_TRIAL_IMAGES, 2),
        "cuda_graph": trainer.graph is not None,
        "bf16_autocast": trainer.autocast.fast_dtype == torch.bfloat16 and device.type == "cuda",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        bf16 = matmul_gflop_per_s(device, torch.bfloat16)
        result |= {"matmul_bf16_gflop_per_s": round(bf16, 1), "matmul_bf16_share": round(gflop_per_s / bf16, 3)}
    return result
