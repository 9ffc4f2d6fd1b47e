"""A LeNet-size MNIST digit classifier, shipped trained, whose features score generated images."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 84  # the penultimate layer: what eval/fld compares


class LeNet(nn.Module):
    """conv 5x5 6 ReLU pool -> conv 5x5 16 ReLU pool -> FC 120 ReLU -> FC 84 ReLU -> FC 10 (LeCun et al. 1998)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),  # 28 -> 28
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, 5),  # 14 -> 10
            nn.ReLU(),
            nn.MaxPool2d(2),  # 10 -> 5
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) in [0, 1], as D sees them -> penultimate activations (B, 84), logits (B, 10)."""
        features = self.trunk(images)
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))  # (B, 10) logits


def classifier_weights_path() -> Path:
    return Path(str(resources.files("harness") / "bundled" / "classifier" / "lenet.pt"))


def load_classifier(device: torch.device | str) -> LeNet:
    """The shipped weights (a state dict, read with weights_only=True), frozen, in eval mode."""
    model = LeNet()
    model.load_state_dict(torch.load(classifier_weights_path(), map_location="cpu", weights_only=True))
    return model.to(device).eval().requires_grad_(False)
