"""InfoGAN modules for 28x28 images (Chen et al. 2016, Table 1, MNIST)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAK = 0.1  # lReLU slope of the paper
SPECTRAL_NORM_EPS = 1e-12  # F.normalize's, as torch's spectral_norm


def spectral_norms(weight: torch.Tensor, u: torch.Tensor, update: torch.Tensor | None) -> torch.Tensor:
    """σ (P,): each member's largest singular value of its weight (P, out, in), estimated from its left
    singular vector `u` (P, out). Where `update` (P,) is true, one power iteration first moves that member's
    `u` in place (in training, as torch's spectral_norm does at every forward). σ carries the gradient."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = weight.detach()
        if update is not None:
            v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=SPECTRAL_NORM_EPS)  # (P, in)
            u_next = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=SPECTRAL_NORM_EPS)
            u.copy_(torch.where(update.view(-1, 1), u_next, u))
        v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=SPECTRAL_NORM_EPS)  # (P, in)
        u = u.clone()  # kept for the backward pass, while the next forward steps the buffer
    return torch.einsum("po,poi,pi->p", u, weight, v)  # uᵀ W v


def spectrally_normed(layer: SNLinear | SNConv2d) -> torch.Tensor:
    """The layer's weight, divided by its spectral norm where `layer.spectral` is on."""
    if not layer.spectral:
        return layer.weight
    w = layer.weight.view(1, len(layer.weight), -1)  # (1, out, in·k·k)
    update = torch.ones(1, dtype=torch.bool, device=w.device) if layer.training else None
    return layer.weight / spectral_norms(w, layer.u.view(1, -1), update)


class SNLinear(nn.Linear):
    """nn.Linear, its weight spectrally normalised where `spectral` is on. The power iteration's vector `u`
    (out,) is a buffer whether or not it is, so that state dicts line up across configs."""

    u: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.spectral = False
        self.register_buffer("u", torch.full((out_features,), out_features**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, spectrally_normed(self), self.bias)


class SNConv2d(nn.Conv2d):
    """A 4x4 stride-2 nn.Conv2d, spectrally normalised as SNLinear."""

    u: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 4, stride=2, padding=1, bias=bias)
        self.spectral = False
        self.register_buffer("u", torch.full((out_channels,), out_channels**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, spectrally_normed(self), self.bias)


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
            SNConv2d(1, 64),  # 28 -> 14
            nn.LeakyReLU(LEAK),
            SNConv2d(64, 128, bias=False),  # 14 -> 7
            nn.BatchNorm2d(128),
            nn.LeakyReLU(LEAK),
            nn.Flatten(),
            SNLinear(128 * 7 * 7, 1024, bias=False),
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
            SNLinear(1024, 128, bias=False),
            nn.BatchNorm1d(128),
            nn.LeakyReLU(LEAK),
            SNLinear(128, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # (B, out_dim), raw: logits are never softmaxed here


class InfoGAN(nn.Module):
    """G, and D and Q on one shared trunk; `spectral_norm` normalises D's layers (d) or D's and Q's (dq)."""

    def __init__(self, latent_dim: int, q_dim: int, spectral_norm: str = "none") -> None:
        super().__init__()
        self.generator = Generator(latent_dim)
        self.trunk = Trunk()
        self.d_head = SNLinear(1024, 1)
        self.q_head = QHead(q_dim)
        self.apply(init_weights)
        on = {"trunk": spectral_norm != "none", "d_head": spectral_norm != "none", "q_head": spectral_norm == "dq"}
        for part, spectral in on.items():
            for layer in getattr(self, part).modules():
                if isinstance(layer, SNLinear | SNConv2d):
                    layer.spectral = spectral

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
