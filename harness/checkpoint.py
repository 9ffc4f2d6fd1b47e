"""A pack member's checkpoint: all that its training needs to go on exactly from a step, as plain tensors, numbers
and strings (`torch.load(..., weights_only=True)` reads it back), and the checks that refuse one that cannot be
used. Where a checkpoint is stored is the listeners' business (`harness.run_logging`); this room knows none."""

from __future__ import annotations

import random
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import torch

from harness.config import TrainConfig

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to go on: unreadable, of another config, architecture or code."""


def code_version() -> str:
    try:
        return metadata.version("harness")
    except metadata.PackageNotFoundError:
        return "unknown"


def global_generators() -> dict[str, Any]:
    """Python's, NumPy's and torch's default generators (CPU, and each GPU where CUDA is in use)."""
    _, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": list(random.getstate()[1]),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": position,
            "gauss": [has_gauss, cached],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_global_generators(state: Mapping[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], *numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def member_checkpoint(
    cfg: TrainConfig,
    step: int,
    pack_state: Mapping[str, Any],
    window: torch.Tensor | None,
    window_steps: int,
    last: Mapping[str, float],
) -> dict[str, Any]:
    """One member at `step`: its pack state (`PackTrainer.member_checkpoint`), its half-filled log window (the
    step stats summed since the last log, and how many steps), its metrics' last values, the global generators,
    and what it belongs to: the config and the code's version."""
    return {
        "format": FORMAT,
        "code": code_version(),
        "config": cfg.model_dump(mode="json"),
        "step": step,
        "pack": dict(pack_state),
        "window": {"sum": None if window is None else window.detach().cpu().clone(), "steps": window_steps},
        "last": dict(last),
        "generators": global_generators(),
    }


def check_checkpoint(checkpoint: Mapping[str, Any], cfg: TrainConfig, model_state: Mapping[str, torch.Tensor]) -> int:
    """The step a checkpoint goes on from, once it is of this format, this config and this architecture
    (`model_state`: a fresh model's); CheckpointError says why not."""
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"format {checkpoint.get('format')!r}, not {FORMAT}")
    if checkpoint["config"] != cfg.model_dump(mode="json"):
        raise CheckpointError("it belongs to another config")
    saved = checkpoint["pack"]["model"]
    if saved.keys() != model_state.keys() or any(saved[k].shape != v.shape for k, v in model_state.items()):
        raise CheckpointError(f"another architecture (written by harness {checkpoint['code']})")
    step = checkpoint["step"]
    if not 0 < step < cfg.steps:
        raise CheckpointError(f"step {step} is not within the run's {cfg.steps} steps")
    return int(step)
