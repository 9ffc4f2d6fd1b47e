"""The fused training step of a pack: P InfoGANs of one architecture (codes, noise, batch size) step as one
model (`harness.packed_model`), each with its own seed (initial weights, batch order, latents), λs,
`continuous_std`, learning rates, Adam betas, `q_optimizer`, spectral norm and instance noise, all of them
per-member tensors.

Each step is the official code's: D and Q (one trunk) take an Adam step on BCE(real) + BCE(fake) + λ·(-L_I) on
detached fakes, then G takes one on BCE(D(G(z, c)) -> real) + λ·(-L_I), D's weights fixed. Members' losses are
summed: their parameters are disjoint, so each member's gradient is its own loss's. A member's randomness is
its own generators', drawn in the order an unpacked run draws it, so its batches and latents are bit for bit
those of a pack of one. On CUDA the forward passes run under bf16 autocast and, after WARMUP_STEPS eager steps,
the step is replayed as a captured CUDA graph: the host only draws each member's batch and latents into static
buffers and launches the graph.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from harness import metrics
from harness.batched_adam import BatchedAdam
from harness.config import TrainConfig
from harness.latent import Latent, LatentSpec
from harness.model import InfoGAN
from harness.packed_model import PackedInfoGAN, member_state

WARMUP_STEPS = 3  # eager steps (on a side stream) before the step is captured as a CUDA graph


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite: the trial diverged."""


class PackTrainer:
    """P InfoGANs, started from `models` (one per config), trained as one on `train_images` (N, 28, 28) uint8
    on `device`. On CUDA, `cuda_graph` replays the step as a CUDA graph."""

    def __init__(
        self,
        configs: Sequence[TrainConfig],
        models: Sequence[InfoGAN],
        train_images: torch.Tensor,
        device: torch.device,
        cuda_graph: bool = True,
    ) -> None:
        self.device, self.train_images = device, train_images
        self.spec = LatentSpec.from_config(configs[0].codes)
        self.batch_size = min(configs[0].optim.batch_size, len(train_images))
        states = [model.state_dict() for model in models]
        self.model = PackedInfoGAN.from_states(states, self.spec.dim, self.spec.q_dim, device)
        self.dtype = self.model.d_head.weight.dtype  # float32; float64 where tests compare to the reference
        self.latent_rngs = [torch.Generator(device).manual_seed(cfg.seed) for cfg in configs]
        self.batch_rngs = [torch.Generator(device).manual_seed(cfg.seed + 2) for cfg in configs]
        self.noise_rngs = [torch.Generator(device).manual_seed(cfg.seed + 3) for cfg in configs]
        self.steps_done, self.total_steps = 0, configs[0].steps
        self.perms = torch.empty(len(configs), len(train_images), dtype=torch.long, device=device)  # (P, N)
        self.offset = len(train_images)  # into this epoch's permutations; a new epoch at the first step
        self.set_members(configs)
        self.opt_d = self.adam(self.d_params(), "lr_d")
        self.opt_g = self.adam(list(self.model.generator.parameters()), "lr_g")
        self.opt_q = self.adam(list(self.model.q_head.parameters()), "lr_q")
        # No autocast cache: a captured graph must cast the weights it is replayed with, not keep the casts.
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False
        )
        self.use_graph = device.type == "cuda" and cuda_graph
        self.cat_entropy = sum(metrics.categorical_entropy(k) for k in self.spec.categorical)

    def set_members(self, configs: Sequence[TrainConfig]) -> None:
        """What differs between members, as (P, ...) tensors, and the static buffers the step reads."""
        self.configs = list(configs)
        members, device = len(configs), self.device

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.dtype, device=device)  # (P,)

        self.lambda_cat = column([cfg.loss.lambda_cat for cfg in configs])
        self.lambda_con = column([cfg.loss.lambda_con for cfg in configs])
        fixed = [cfg.loss.continuous_std == "fixed" for cfg in configs]
        self.fixed_std = torch.tensor(fixed, device=device).view(members, 1, 1)
        # Q's head steps with D's Adam (q_optimizer d) in D's step, or in G's step with G's (g) or its own (own).
        q_with_d = [cfg.optim.q_optimizer == "d" for cfg in configs]
        self.q_in_d = any(q_with_d)
        self.q_in_g = not all(q_with_d)
        mixed = self.q_in_d and self.q_in_g
        self.q_mask_d = column([float(d) for d in q_with_d]) if mixed else None
        self.q_mask_g = column([float(not d) for d in q_with_d]) if mixed else None
        self.model.set_spectral_norm([cfg.model.spectral_norm for cfg in configs])
        self.instance_noise = [cfg.loss.instance_noise for cfg in configs]
        # Instance noise: each member's draws for real and fake images (P, 2, B, 28, 28) and its std at this step.
        noise_shape = (members, 2, self.batch_size, 28, 28)
        noisy = any(std > 0 for std in self.instance_noise)
        self.noise = torch.zeros(noise_shape, dtype=self.dtype, device=device) if noisy else None
        self.noise_std = column([0.0] * members)
        self.images = torch.empty(self.batch_size, members, 28, 28, dtype=torch.uint8, device=device)  # (B, P, 28, 28)
        self.draws = self.spec.empty_draws(members, self.batch_size, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_stats = torch.empty(0)
        self.eager_steps = 0

    def adam(self, params: list[torch.Tensor], lr: str) -> BatchedAdam:
        optims = [cfg.optim for cfg in self.configs]
        rates = {
            "lr_d": [o.lr_d for o in optims],
            "lr_g": [o.lr_g for o in optims],
            "lr_q": [{"d": o.lr_d, "g": o.lr_g, "own": o.lr_q}[o.q_optimizer] for o in optims],
        }
        own = [lr == "lr_q" and o.q_optimizer == "own" for o in optims]  # Q's own Adam: its own betas
        beta1 = [o.q_beta1 if q else o.beta1 for o, q in zip(optims, own, strict=True)]
        beta2 = [o.q_beta2 if q else o.beta2 for o, q in zip(optims, own, strict=True)]
        return BatchedAdam.create(params, rates[lr], beta1, beta2)

    def d_params(self) -> list[torch.Tensor]:
        return [*self.model.trunk.parameters(), *self.model.d_head.parameters()]

    @property
    def members(self) -> int:
        return len(self.configs)

    # -- the step --------------------------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One D+Q update then one G update of every member; returns their detached stats (P, 4 + n_categorical):
        loss/d, loss/g, loss/info, nll_con, CE of each categorical code. No host sync."""
        self.next_batch()
        if not self.use_graph:
            return self.fused_step()
        if self.graph is None:
            if self.eager_steps < WARMUP_STEPS:
                self.eager_steps += 1
                return on_side_stream(self.fused_step)
            self.capture()
        assert self.graph is not None
        self.graph.replay()
        return self.graph_stats.clone()

    def next_batch(self) -> None:
        """Each member's next batch (its own batch order) and latents, into the static buffers."""
        size, batch = len(self.train_images), self.batch_size
        if size - self.offset < batch:  # a new epoch, the last partial batch dropped
            for member, rng in enumerate(self.batch_rngs):
                torch.randperm(size, generator=rng, out=self.perms[member])
            self.offset = 0
        index = self.perms[:, self.offset : self.offset + batch].t().reshape(-1)  # (B·P,) batch-major
        torch.index_select(self.train_images, 0, index, out=self.images.view(batch * self.members, 28, 28))
        self.offset += batch
        for member, rng in enumerate(self.latent_rngs):
            self.spec.draw(self.draws, member, rng)
        if self.noise is not None:  # annealed linearly from its std at step 1 to 0 after the last
            fraction_left = 1 - self.steps_done / self.total_steps
            self.noise_std.copy_(torch.tensor([std * fraction_left for std in self.instance_noise]))
            for member, (rng, std) in enumerate(zip(self.noise_rngs, self.instance_noise, strict=True)):
                if std > 0:
                    torch.randn(self.noise[member].shape, generator=rng, out=self.noise[member])
        self.steps_done += 1

    def capture(self) -> None:
        """Capture `fused_step` on the static buffers as a CUDA graph; where capture fails, step eagerly."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.graph_stats = self.fused_step()
        except RuntimeError as err:
            warnings.warn(f"CUDA graph capture failed, stepping eagerly: {err}", stacklevel=2)
            self.use_graph = False
            return
        self.graph = graph

    def fused_step(self) -> torch.Tensor:
        latent = self.spec.latent(self.draws)  # (P, B, ...)
        real = self.images.to(self.dtype).div_(255)  # (B, P, 28, 28) in [0, 1]: member p's batch in channel p
        with self.autocast:
            fake = self.model.generator(latent.vector)  # (B, P, 28, 28)
        if self.noise is not None:  # what D and Q see: each member's images plus its instance noise
            noise = self.noise.permute(1, 2, 0, 3, 4) * self.noise_std.view(1, 1, -1, 1, 1)  # (2, B, P, 28, 28)
            real, fake = real + noise[0], fake + noise[1].to(fake.dtype)
        loss_d = self.step_d(real, fake, latent)
        loss_g, loss_info, ce, nll = self.step_g(fake, latent)
        return torch.cat([torch.stack([loss_d, loss_g, loss_info, nll], dim=1), ce], dim=1).detach()

    def step_d(self, real: torch.Tensor, fake: torch.Tensor, latent: Latent) -> torch.Tensor:
        """D and Q (shared trunk) take one step: real vs fake, plus λ·(-L_I) on `fake` (B, P, 28, 28) made from
        `latent`, detached here so that G's graph stays for `step_g`; returns loss/d (P,)."""
        with self.autocast:
            d_real, _ = self.model.discriminate(real)  # (P, B)
            d_fake, q_fake = self.model.discriminate(fake.detach())  # (P, B), (P, B, q_dim)
        loss_d = binary_cross_entropy(d_real, 1.0) + binary_cross_entropy(d_fake, 0.0)  # (P,)
        ce, nll = self.info_terms(q_fake, latent)
        d_params, q_params = self.d_params(), list(self.model.q_head.parameters()) if self.q_in_d else []
        grads = torch.autograd.grad((loss_d + self.info_loss(ce, nll)).sum(), [*d_params, *q_params])
        self.opt_d.step(grads[: len(d_params)])
        if q_params:
            self.opt_q.step(grads[len(d_params) :], self.q_mask_d)
        return loss_d

    def step_g(
        self, fake: torch.Tensor, latent: Latent
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """G (and Q where it steps with G) take one step: fool D and make the codes recoverable from `fake`
        (attached to G's graph); D's weights stay and get no gradient. Returns loss/g (P,), loss/info (P,),
        ce (P, n_cat) and nll (P,)."""
        with self.autocast:
            d_fake, q_fake = self.model.discriminate(fake)
        loss_g = binary_cross_entropy(d_fake, 1.0)
        ce, nll = self.info_terms(q_fake, latent)
        loss_info = self.info_loss(ce, nll)
        g_params = list(self.model.generator.parameters())
        q_params = list(self.model.q_head.parameters()) if self.q_in_g else []
        grads = torch.autograd.grad((loss_g + loss_info).sum(), [*g_params, *q_params])
        self.opt_g.step(grads[: len(g_params)])
        if q_params:
            self.opt_q.step(grads[len(g_params) :], self.q_mask_g)
        return loss_g, loss_info, ce, nll

    def info_terms(self, q_out: torch.Tensor, latent: Latent) -> tuple[torch.Tensor, torch.Tensor]:
        """From Q's outputs (P, B, q_dim): the cross-entropy of each categorical code's logits (P, n_cat) and
        the summed Gaussian NLL of the continuous codes (P,), batch means: -L_I up to the constant H(c)."""
        q_out = q_out.to(self.dtype)  # bf16 under autocast
        members, batch, _ = q_out.shape
        n_logits = sum(self.spec.categorical)
        logits = q_out[..., :n_logits].split(list(self.spec.categorical), dim=-1)  # (P, B, K) each
        ce = [
            F.cross_entropy(code.reshape(-1, code.shape[-1]), latent.categories[..., i].reshape(-1), reduction="none")
            .view(members, batch)
            .mean(dim=1)
            for i, code in enumerate(logits)
        ]
        mean, log_std = q_out[..., n_logits:].chunk(2, dim=-1)  # (P, B, n_con) each
        log_std = torch.where(self.fixed_std, 0.0, log_std)  # continuous_std fixed: σ = 1
        z = (latent.continuous - mean) * torch.exp(-log_std)
        nll = (0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi)).sum(dim=-1).mean(dim=-1)
        return torch.stack(ce, dim=1) if ce else q_out.new_zeros(members, 0), nll

    def info_loss(self, ce: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return self.lambda_cat * ce.sum(dim=1) + self.lambda_con * nll  # (P,)

    # -- members ---------------------------------------------------------------------------------------------

    def member_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member `member`'s InfoGAN state dict (views into the pack: load it, do not keep it)."""
        return member_state(self.model.state_dict(), self.members, member)

    def member_checkpoint(self, member: int) -> dict[str, object]:
        """All that member `member` needs to go on exactly where it is: its weights and BatchNorm statistics,
        its three Adams' states, its generators, its epoch's batch order and the position in it."""
        optimisers = {"d": self.opt_d, "g": self.opt_g, "q": self.opt_q}
        return {
            "model": {k: v.detach().clone().cpu() for k, v in self.member_state(member).items()},
            "adam": {name: opt.member_state(member) for name, opt in optimisers.items()},
            "generators": {
                "latent": self.latent_rngs[member].get_state(),
                "batch": self.batch_rngs[member].get_state(),
                "noise": self.noise_rngs[member].get_state(),
            },
            "order": self.perms[member].cpu().clone(),
            "offset": self.offset,
            "steps_done": self.steps_done,
        }

    def load_member_checkpoint(self, member: int, checkpoint: dict[str, Any]) -> None:
        """Put a `member_checkpoint` (its weights loaded already, as the pack was made) back in place."""
        optimisers = {"d": self.opt_d, "g": self.opt_g, "q": self.opt_q}
        for name, opt in optimisers.items():
            opt.load_member_state(member, checkpoint["adam"][name])
        generators = checkpoint["generators"]
        self.latent_rngs[member].set_state(generators["latent"])
        self.batch_rngs[member].set_state(generators["batch"])
        self.noise_rngs[member].set_state(generators["noise"])
        self.perms[member].copy_(checkpoint["order"])
        self.offset, self.steps_done = checkpoint["offset"], checkpoint["steps_done"]

    def select(self, keep: Sequence[int]) -> None:
        """Go on with the members `keep` (indices) only, each where it is; the others cost nothing from here."""
        self.model = self.model.select(keep)
        self.latent_rngs = [self.latent_rngs[m] for m in keep]
        self.batch_rngs = [self.batch_rngs[m] for m in keep]
        self.noise_rngs = [self.noise_rngs[m] for m in keep]
        self.perms = self.perms[list(keep)]
        self.set_members([self.configs[m] for m in keep])
        self.opt_d = self.opt_d.select(keep, self.d_params())
        self.opt_g = self.opt_g.select(keep, list(self.model.generator.parameters()))
        self.opt_q = self.opt_q.select(keep, list(self.model.q_head.parameters()))

    def log_values(self, means: Sequence[float]) -> dict[str, float]:
        """One member's means of `step`'s stats over a log window, named for MLflow; raises DivergenceError on
        a non-finite loss."""
        loss_d, loss_g, loss_info, nll, *ce = means
        values = {"loss/d": loss_d, "loss/g": loss_g, "loss/info": loss_info}
        if not all(math.isfinite(v) for v in (loss_d, loss_g, loss_info)):
            raise DivergenceError(f"non-finite loss: loss/d={loss_d}, loss/g={loss_g}, loss/info={loss_info}")
        if ce:
            values["info/mi_cat"] = self.cat_entropy - sum(ce)
            values["info/h_cat"] = self.cat_entropy
            if len(ce) > 1:
                for i, (k, code_ce) in enumerate(zip(self.spec.categorical, ce, strict=True)):
                    values[f"info/mi_cat/c{i}"] = metrics.mutual_information_bound(code_ce, k)
        if self.spec.continuous:
            values["info/mi_con"] = self.spec.continuous * metrics.uniform_entropy() - nll
        return values


def binary_cross_entropy(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Each member's batch mean of BCE against a constant target: (P, B) logits -> (P,)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast; float64 stays
    targets = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def on_side_stream(work: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run CUDA work on a side stream (how eager steps before a graph capture must run), then rejoin."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = work()
    torch.cuda.current_stream().wait_stream(stream)
    return result
