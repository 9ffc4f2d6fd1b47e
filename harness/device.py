"""Which device a run trains on, and how many trials a sweep's worker packs there by default."""

from __future__ import annotations

import torch

# Trials a worker packs when the study does not say. A pack must not lose throughput against one trial at a
# time: on the 2-core CPU this project is measured on, 2 ties and 4 loses 13 % (benchmarks/README.md, "Trial
# packs"). On a GPU one trial's ~650 kernels a step leave the chip idle: 16 members fill it (an estimate
# until benchmarks/gpu_check.sh runs on one).
DEFAULT_PACK = {"cpu": 1, "cuda": 16, "mps": 4}


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then the CPU; any other name as torch reads it."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_pack(device: torch.device) -> int:
    """How many trials a sweep's worker trains as one pack on `device` when its study does not say."""
    return DEFAULT_PACK.get(device.type, 1)
