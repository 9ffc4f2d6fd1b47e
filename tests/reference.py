"""The unpacked trainer as it was before packs (de8f192: `InfoGANTrainer` and the batch loop of its `Member`):
`harness.model`'s modules and torch.optim.Adam, one model at a time. The oracle that a pack's members are
checked against; never used by the harness."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.config import TrainConfig
from harness.latent import Latent, LatentSpec
from harness.model import InfoGAN
from harness.seeding import seed_everything


class ReferenceTrainer:
    """One InfoGAN on `train_images` (N, 28, 28) uint8, with its batch order and latents from `cfg.seed`."""

    def __init__(self, cfg: TrainConfig, train_images: torch.Tensor, device: torch.device) -> None:
        self.cfg, self.device, self.train_images = cfg, device, train_images
        self.spec = LatentSpec.from_config(cfg.codes)
        seed_everything(cfg.seed)
        self.model = InfoGAN(self.spec.dim, self.spec.q_dim, cfg.model.spectral_norm).to(device)
        optim = cfg.optim
        betas = (optim.beta1, optim.beta2)
        model = self.model
        d_parts = [model.trunk, model.d_head, *([model.q_head] if optim.q_optimizer == "d" else [])]
        g_parts = [model.generator, *([model.q_head] if optim.q_optimizer == "g" else [])]
        self.frozen_in_g_step = d_parts
        self.opt_d = torch.optim.Adam([p for m in d_parts for p in m.parameters()], lr=optim.lr_d, betas=betas)
        self.opt_g = torch.optim.Adam([p for m in g_parts for p in m.parameters()], lr=optim.lr_g, betas=betas)
        self.opt_q = (  # Q's own Adam, stepped with G's
            torch.optim.Adam(model.q_head.parameters(), lr=optim.lr_q, betas=(optim.q_beta1, optim.q_beta2))
            if optim.q_optimizer == "own"
            else None
        )
        self.latent_rng = torch.Generator(device).manual_seed(cfg.seed)
        self.batch_rng = torch.Generator(device).manual_seed(cfg.seed + 2)
        self.noise_rng = torch.Generator(device).manual_seed(cfg.seed + 3)
        self.steps_done = 0
        self.batch_size = min(cfg.optim.batch_size, len(train_images))
        self.order = torch.empty(0, dtype=torch.long, device=device)

    def next_batch(self) -> torch.Tensor:
        """(B, 28, 28) uint8: the next batch of this epoch's permutation, a new one when too few are left."""
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.train_images), generator=self.batch_rng, device=self.device)
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.train_images[index]

    def sample(self) -> Latent:
        """The latents of one batch, drawn as `LatentSpec.sample` drew them before packs."""
        batch, spec, rng, device = self.batch_size, self.spec, self.latent_rng, self.device
        noise = torch.rand(batch, spec.noise, generator=rng, device=device) * 2 - 1
        categories = (
            torch.stack([torch.randint(k, (batch,), generator=rng, device=device) for k in spec.categorical], dim=1)
            if spec.categorical
            else torch.zeros(batch, 0, dtype=torch.long, device=device)
        )
        continuous = torch.rand(batch, spec.continuous, generator=rng, device=device) * 2 - 1
        one_hots = [F.one_hot(categories[:, i], k).to(noise.dtype) for i, k in enumerate(spec.categorical)]
        return Latent(torch.cat([noise, *one_hots, continuous], dim=1), categories, continuous)

    def step(self) -> torch.Tensor:
        """One step on the next batch: [loss/d, loss/g, loss/info, nll_con, ce per categorical code...]."""
        real = self.next_batch().unsqueeze(1).to(torch.get_default_dtype()).div_(255)  # (B, 1, 28, 28)
        latent = self.sample()
        fake = self.model.generator(latent.vector)
        std = self.cfg.loss.instance_noise * (1 - self.steps_done / self.cfg.steps)  # annealed to 0
        self.steps_done += 1
        if std > 0:
            noise = torch.randn(2, len(real), 28, 28, generator=self.noise_rng, device=self.device)
            real, fake = real + std * noise[0].unsqueeze(1), fake + std * noise[1].unsqueeze(1)
        loss_d = self.step_d(real, fake, latent)
        loss_g, loss_info, ce, nll = self.step_g(fake, latent)
        return torch.cat([torch.stack([loss_d, loss_g, loss_info, nll]), ce]).detach()

    def info_terms(self, q_out: torch.Tensor, latent: Latent) -> tuple[torch.Tensor, torch.Tensor]:
        n_logits = sum(self.spec.categorical)
        logits = q_out[:, :n_logits].split(list(self.spec.categorical), dim=1)
        ce = (
            torch.stack([F.cross_entropy(code_logits, latent.categories[:, i]) for i, code_logits in enumerate(logits)])
            if logits
            else q_out.new_zeros(0)
        )
        mean, log_std = q_out[:, n_logits:].chunk(2, dim=1)
        if self.cfg.loss.continuous_std == "fixed":
            log_std = torch.zeros_like(log_std)
        z = (latent.continuous - mean) * torch.exp(-log_std)
        nll = (0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi)).sum(dim=1).mean()
        return ce, nll

    def info_loss(self, ce: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return self.cfg.loss.lambda_cat * ce.sum() + self.cfg.loss.lambda_con * nll

    def step_d(self, real: torch.Tensor, fake: torch.Tensor, latent: Latent) -> torch.Tensor:
        ones = torch.ones(len(real), device=self.device)
        zeros = torch.zeros(len(fake), device=self.device)
        d_real, _ = self.model.discriminate(real)
        d_fake, q_fake = self.model.discriminate(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        ce, nll = self.info_terms(q_fake, latent)
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d + self.info_loss(ce, nll)).backward()
        self.opt_d.step()
        return loss_d

    def step_g(
        self, fake: torch.Tensor, latent: Latent
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ones = torch.ones(len(fake), device=self.device)
        for module in self.frozen_in_g_step:
            module.requires_grad_(False)
        d_fake, q_fake = self.model.discriminate(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_fake, ones)
        ce, nll = self.info_terms(q_fake, latent)
        loss_info = self.info_loss(ce, nll)
        optimisers = [self.opt_g, *([self.opt_q] if self.opt_q is not None else [])]
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        (loss_g + loss_info).backward()
        for optimiser in optimisers:
            optimiser.step()
        for module in self.frozen_in_g_step:
            module.requires_grad_(True)
        return loss_g, loss_info, ce, nll
