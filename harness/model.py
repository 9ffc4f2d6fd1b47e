"""InfoGAN modules for 28x28 images (Chen et al. 2016, Table 1, MNIST)."""

from __future__ import annotations

import torch
from torch import nn

LEAK = 0.1  # lReLU slope of the paper


class Generator(nn.Module):
    """FC 1024 BN ReLU -> FC 7·7·128 BN ReLU -> upconv 64 BN ReLU -> upconv 1, sigmoid."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 1024, bias=False),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 128 * 7 * 7, bias=False),
            nn.BatchNorm1d(128 * 7 * 7),
            nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1, bias=False),  # 7 -> 14
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1),  # 14 -> 28
            nn.Sigmoid(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.fc(latent).view(-1, 128, 7, 7)  # (B, 128, 7, 7)
        return self.deconv(h)  # (B, 1, 28, 28) in [0, 1]


class Trunk(nn.Module):
    """The layers D and Q share: conv 64 lReLU -> conv 128 BN lReLU -> FC 1024 BN lReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 64, 4, stride=2, padding=1),  # 28 -> 14
            nn.LeakyReLU(LEAK),
            nn.Conv2d(64, 128, 4, stride=2, padding=1, bias=False),  # 14 -> 7
            nn.BatchNorm2d(128),
            nn.LeakyReLU(LEAK),
            nn.Flatten(),
            nn.Linear(128 * 7 * 7, 1024, bias=False),
            nn.BatchNorm1d(1024),
            nn.LeakyReLU(LEAK),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)  # (B, 1024)


class QHead(nn.Module):
    """FC 128 BN lReLU -> FC to logits per categorical code and mean, log-std per continuous code."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(1024, 128, bias=False),
            nn.BatchNorm1d(128),
            nn.LeakyReLU(LEAK),
            nn.Linear(128, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # (B, out_dim), raw: logits are never softmaxed here


class InfoGAN(nn.Module):
    """G, and D and Q on one shared trunk."""

    def __init__(self, latent_dim: int, q_dim: int) -> None:
        super().__init__()
        self.generator = Generator(latent_dim)
        self.trunk = Trunk()
        self.d_head = nn.Linear(1024, 1)
        self.q_head = QHead(q_dim)
        self.apply(init_weights)

    def discriminate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(images)  # (B, 1024)
        return self.d_head(features).squeeze(1), self.q_head(features)  # (B,), (B, q_dim)


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) weights (BatchNorm scales N(1, 0.02)), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
