"""The latent layout of G's input: noise, one-hot categorical codes, continuous codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from harness.config import CodesConfig


class Latent(NamedTuple):
    """One model's latents, or a pack's with a leading member dim (P, B, ...)."""

    vector: torch.Tensor  # (B, spec.dim): [noise | one-hot codes | continuous codes]
    categories: torch.Tensor  # (B, n_categorical) int64, the drawn category of each code
    continuous: torch.Tensor  # (B, n_continuous) in [-1, 1]


class LatentDraws(NamedTuple):
    """A pack's raw draws for one batch, written in place member by member (static buffers, so that the
    step that reads them can be a captured CUDA graph)."""

    noise: torch.Tensor  # (P, B, noise) in [0, 1)
    categories: torch.Tensor  # (P, n_categorical, B) int64
    continuous: torch.Tensor  # (P, B, n_continuous) in [0, 1)


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
        """(..., B, noise), (..., B, n_categorical), (..., B, n_continuous) -> their Latent."""
        one_hots = [F.one_hot(categories[..., i], k).to(noise.dtype) for i, k in enumerate(self.categorical)]
        vector = torch.cat([noise, *one_hots, continuous], dim=-1)
        return Latent(vector, categories, continuous)

    def empty_draws(self, members: int, batch: int, device: torch.device) -> LatentDraws:
        return LatentDraws(
            torch.empty(members, batch, self.noise, device=device),
            torch.empty(members, len(self.categorical), batch, dtype=torch.long, device=device),
            torch.empty(members, batch, self.continuous, device=device),
        )

    def draw(self, draws: LatentDraws, member: int, generator: torch.Generator) -> None:
        """Member `member`'s draws for one batch from its generator: noise, each categorical code, the
        continuous codes, in this order (the official code's distributions, see `latent`)."""
        torch.rand(draws.noise.shape[1:], generator=generator, out=draws.noise[member])
        for i, k in enumerate(self.categorical):
            torch.randint(k, draws.categories.shape[2:], generator=generator, out=draws.categories[member, i])
        torch.rand(draws.continuous.shape[1:], generator=generator, out=draws.continuous[member])

    def latent(self, draws: LatentDraws) -> Latent:
        """The pack's latents (P, B, ...): noise and continuous codes ~ Unif(-1, 1), categories ~ Cat(K)."""
        return self.build(draws.noise * 2 - 1, draws.categories.transpose(1, 2), draws.continuous * 2 - 1)

    def sample(self, batch: int, generator: torch.Generator, device: torch.device) -> Latent:
        """One model's latents (B, ...), drawn as a pack member's are."""
        draws = self.empty_draws(1, batch, device)
        self.draw(draws, 0, generator)
        vector, categories, continuous = self.latent(draws)
        return Latent(vector[0], categories[0], continuous[0])
