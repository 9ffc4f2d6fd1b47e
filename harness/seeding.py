"""Where a run's randomness starts: the global generators, and the initial weights its seed gives."""

from __future__ import annotations

import random

import numpy as np
import torch

from harness.config import TrainConfig
from harness.latent import LatentSpec
from harness.model import InfoGAN


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch's default generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(cfg: TrainConfig, device: torch.device) -> InfoGAN:
    """The InfoGAN `cfg` starts from: its weights come from `cfg.seed` alone."""
    seed_everything(cfg.seed)
    spec = LatentSpec.from_config(cfg.codes)
    return InfoGAN(spec.dim, spec.q_dim, cfg.model.spectral_norm).to(device)
