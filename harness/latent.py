"""The latent layout of G's input: noise, one-hot categorical codes, continuous codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from harness.config import CodesConfig


class Latent(NamedTuple):
    vector: torch.Tensor  # (B, spec.dim): [noise | one-hot codes | continuous codes]
    categories: torch.Tensor  # (B, n_categorical) int64, the drawn category of each code
    continuous: torch.Tensor  # (B, n_continuous) in [-1, 1]


@dataclass(frozen=True)
class LatentSpec:
    noise: int
    categorical: tuple[int, ...]
    continuous: int

    @classmethod
    def from_config(cls, codes: CodesConfig) -> LatentSpec:
        return cls(codes.noise, tuple(codes.categorical), codes.continuous)

    @property
    def dim(self) -> int:
        return self.noise + sum(self.categorical) + self.continuous

    @property
    def q_dim(self) -> int:
        """Q's output: logits per categorical code, then a mean and a log-std per continuous code."""
        return sum(self.categorical) + 2 * self.continuous

    def build(self, noise: torch.Tensor, categories: torch.Tensor, continuous: torch.Tensor) -> Latent:
        one_hots = [F.one_hot(categories[:, i], k).to(noise.dtype) for i, k in enumerate(self.categorical)]
        vector = torch.cat([noise, *one_hots, continuous], dim=1)
        return Latent(vector, categories, continuous)

    def sample(self, batch: int, generator: torch.Generator, device: torch.device) -> Latent:
        """Noise and continuous codes ~ Unif(-1, 1) (the official code), categories ~ Cat(K) uniform."""
        noise = torch.rand(batch, self.noise, generator=generator, device=device) * 2 - 1
        categories = (
            torch.stack(
                [torch.randint(k, (batch,), generator=generator, device=device) for k in self.categorical], dim=1
            )
            if self.categorical
            else torch.zeros(batch, 0, dtype=torch.long, device=device)
        )
        continuous = torch.rand(batch, self.continuous, generator=generator, device=device) * 2 - 1
        return self.build(noise, categories, continuous)
