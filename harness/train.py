"""Train InfoGANs: `train(cfg, listeners) -> TrainResult` trains one; `train_pack(groups)` trains several in
lockstep, evaluated at the same steps (a trial's seeds). Knows neither MLflow nor Optuna: each log window and
each evaluation goes to the listeners."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from harness import metrics
from harness.config import TrainConfig, flatten
from harness.data import Dataset, load_dataset
from harness.evaluate import Evaluation, Evaluator, HeldOut, as_float_images, held_out_for
from harness.latent import Latent, LatentSpec
from harness.model import InfoGAN


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite: the trial diverged."""


@dataclass(frozen=True)
class RunInfo:
    device: str
    data_source: str
    data_location: str
    train_images: int
    test_images: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    metrics: dict[str, float]  # the last log window and the last evaluation
    weights: dict[str, object] = field(repr=False)  # state dicts + latent layout; torch.save-able
    info: RunInfo
    seconds: float


class TrainListener:
    """Receives progress; every hook may raise to stop training (e.g. to prune)."""

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None: ...

    def on_log(self, step: int, values: dict[str, float]) -> None: ...

    def on_eval(self, evaluation: Evaluation) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch's default generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class InfoGANTrainer:
    """Model, optimisers and the D+Q / G update of one step."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.spec = LatentSpec.from_config(cfg.codes)
        self.model = InfoGAN(self.spec.dim, self.spec.q_dim).to(device)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        model = self.model
        # Q's head steps with D's optimiser (the official code) or with G's (many ports);
        # either way the info loss reaches the shared trunk in the D step.
        q_with_d = cfg.optim.q_optimizer == "d"
        d_parts = [model.trunk, model.d_head, *([model.q_head] if q_with_d else [])]
        g_parts = [model.generator, *([] if q_with_d else [model.q_head])]
        self.frozen_in_g_step = d_parts  # their weights stay, G's gradient still flows through them
        self.opt_d = torch.optim.Adam([p for m in d_parts for p in m.parameters()], lr=cfg.optim.lr_d, betas=betas)
        self.opt_g = torch.optim.Adam([p for m in g_parts for p in m.parameters()], lr=cfg.optim.lr_g, betas=betas)
        self.latent_rng = torch.Generator(device).manual_seed(cfg.seed)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.cat_entropy = sum(metrics.categorical_entropy(k) for k in self.spec.categorical)

    def info_terms(self, q_out: torch.Tensor, latent: Latent) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy per categorical code (n_cat,) and the summed Gaussian NLL of the
        continuous codes (), both batch means: -L_I up to the constant H(c)."""
        q_out = q_out.float()
        n_logits = sum(self.spec.categorical)
        logits = q_out[:, :n_logits].split(list(self.spec.categorical), dim=1)
        ce = (
            torch.stack([F.cross_entropy(code_logits, latent.categories[:, i]) for i, code_logits in enumerate(logits)])
            if logits
            else q_out.new_zeros(0)
        )
        mean, log_std = q_out[:, n_logits:].chunk(2, dim=1)  # (B, n_con) each
        if self.cfg.loss.continuous_std == "fixed":
            log_std = torch.zeros_like(log_std)
        z = (latent.continuous - mean) * torch.exp(-log_std)
        nll = (0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi)).sum(dim=1).mean()
        return ce, nll

    def info_loss(self, ce: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        return self.cfg.loss.lambda_cat * ce.sum() + self.cfg.loss.lambda_con * nll

    def step(self, real: torch.Tensor) -> torch.Tensor:
        """One D+Q update then one G update; returns detached stats
        [loss/d, loss/g, loss/info, nll_con, ce per categorical code...] without a host sync."""
        latent = self.spec.sample(real.shape[0], self.latent_rng, self.device)
        with self.autocast:
            fake = self.model.generator(latent.vector)  # (B, 1, 28, 28) in [0, 1]
        loss_d = self.step_d(real, fake, latent)
        loss_g, loss_info, ce, nll = self.step_g(fake, latent)
        return torch.cat([torch.stack([loss_d, loss_g, loss_info, nll]), ce]).detach()

    def step_d(self, real: torch.Tensor, fake: torch.Tensor, latent: Latent) -> torch.Tensor:
        """D and Q (shared trunk) take one step: real vs fake, plus λ·(-L_I) on `fake` made from `latent`,
        detached here so that G's graph stays for `step_g`; returns loss/d."""
        ones = torch.ones(len(real), device=self.device)
        zeros = torch.zeros(len(fake), device=self.device)
        with self.autocast:
            d_real, _ = self.model.discriminate(real)
            d_fake, q_fake = self.model.discriminate(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real.float(), ones) + F.binary_cross_entropy_with_logits(
            d_fake.float(), zeros
        )
        ce, nll = self.info_terms(q_fake, latent)
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d + self.info_loss(ce, nll)).backward()
        self.opt_d.step()
        return loss_d

    def step_g(
        self, fake: torch.Tensor, latent: Latent
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """G (and Q if it steps with G) take one step: fool D and make the codes recoverable from `fake`
        (attached to G's graph); returns loss/g, loss/info, ce (n_cat,) and nll ()."""
        ones = torch.ones(len(fake), device=self.device)
        for module in self.frozen_in_g_step:
            module.requires_grad_(False)
        with self.autocast:
            d_fake, q_fake = self.model.discriminate(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_fake.float(), ones)
        ce, nll = self.info_terms(q_fake, latent)
        loss_info = self.info_loss(ce, nll)
        self.opt_g.zero_grad(set_to_none=True)
        (loss_g + loss_info).backward()
        self.opt_g.step()
        for module in self.frozen_in_g_step:
            module.requires_grad_(True)
        return loss_g, loss_info, ce, nll

    def window_metrics(self, stats_sum: torch.Tensor, count: int) -> dict[str, float]:
        """Means over a log window of `step`'s stats, named for MLflow."""
        loss_d, loss_g, loss_info, nll, *ce = (stats_sum / count).tolist()  # the one host sync
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

    def weights(self) -> dict[str, object]:
        parts = ("generator", "trunk", "d_head", "q_head")
        state = {name: getattr(self.model, name).state_dict() for name in parts}
        spec = {
            "noise": self.spec.noise,
            "categorical": list(self.spec.categorical),
            "continuous": self.spec.continuous,
        }
        return {**state, "latent": spec}


class GroupListener:
    """Sees each round of a group of pack members trained together (a trial's seeds): the log values, or the
    evaluations, of all its members at one step, in member order. Raising stops every member of the group."""

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None: ...

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None: ...

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None: ...


@dataclass(frozen=True)
class Group:
    """Members that stand or fall together: one config each (e.g. one seed each), each member's own
    listeners, and the listeners of the group's rounds."""

    configs: Sequence[TrainConfig]
    listeners: Sequence[Sequence[TrainListener]]
    watchers: Sequence[GroupListener] = ()


@dataclass(frozen=True)
class GroupOutcome:
    results: list[TrainResult]  # one per member; empty when the group stopped
    error: Exception | None  # what stopped it: a listener's exception (a pruned trial), a diverging loss


SHARED_KEYS = ("data", "codes", "optim.batch_size", "steps", "eval_every", "log_every", "device")  # across a pack


class Member:
    """One InfoGAN of a pack: its model and optimisers, its evaluator, its batch order and log window. All of
    its randomness comes from its config's seed, as if it trained alone."""

    def __init__(self, cfg: TrainConfig, data: Dataset, held_out: HeldOut, device: torch.device) -> None:
        self.cfg, self.data = cfg, data
        seed_everything(cfg.seed)  # the initial weights
        self.trainer = InfoGANTrainer(cfg, device)
        self.evaluate = Evaluator(self.trainer.spec, held_out, cfg.seed, device)
        self.batch_rng = torch.Generator(device).manual_seed(cfg.seed + 2)
        self.batch_size = min(cfg.optim.batch_size, len(data.train_images))
        self.order = torch.empty(0, dtype=torch.long, device=device)
        self.window: torch.Tensor | None = None  # the step stats summed over the log window
        self.window_steps = 0
        self.last: dict[str, float] = {}  # every metric's last value

    def step(self) -> None:
        if len(self.order) < self.batch_size:  # a new epoch, the last partial batch dropped
            self.order = torch.randperm(len(self.data.train_images), generator=self.batch_rng, device=self.order.device)
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        stats = self.trainer.step(as_float_images(self.data.train_images[index]))
        self.window = stats if self.window is None else self.window + stats
        self.window_steps += 1

    def log_values(self, seconds: float) -> dict[str, float]:
        """The log window's metrics (raises DivergenceError on a non-finite loss); `seconds`: its wall time."""
        assert self.window is not None, "a log window holds at least one step"
        values = self.trainer.window_metrics(self.window, self.window_steps)
        values["perf/images_per_s"] = self.window_steps * self.batch_size / seconds
        self.window, self.window_steps = None, 0
        self.last.update(values)
        return values

    def evaluation(self, step: int) -> Evaluation:
        evaluation = self.evaluate(self.trainer.model, step)
        self.last.update(evaluation.metrics)
        return evaluation


def check_packable(configs: Sequence[TrainConfig]) -> None:
    """Members of a pack share what makes them step and evaluate together; ValueError names what differs."""
    first = flatten(configs[0].model_dump())
    for cfg in configs[1:]:
        flat = flatten(cfg.model_dump())
        differ = [k for k in flat if k.startswith(SHARED_KEYS) and flat[k] != first[k]]
        if differ:
            raise ValueError(f"pack members must share {', '.join(differ)}")


def train_pack(groups: Sequence[Group]) -> list[GroupOutcome]:
    """Train every member of every group in lockstep: one step each in turn, evaluated at the same steps,
    each as it would train alone. A group stops as a whole when one of its members' losses diverges or one of
    its listeners raises; the others go on. Ctrl-C stops them all."""
    started = time.perf_counter()
    configs = [cfg for group in groups for cfg in group.configs]
    check_packable(configs)
    shared = configs[0]
    device = resolve_device(shared.device)
    data = load_dataset(shared.data).to(device)
    info = RunInfo(str(device), data.source, data.location, len(data.train_images), len(data.test_images))
    held_out = held_out_for(data, device, with_properties=shared.codes.continuous > 0)
    errors: dict[int, Exception] = {}
    members: dict[int, list[Member]] = {}

    def each_live(work: Callable[[int, Group], None]) -> None:
        """Run `work` for each group still training; an exception stops that group alone."""
        for g, group in enumerate(groups):
            if g in errors:
                continue
            try:
                work(g, group)
            except Exception as err:  # a pruned trial, a diverging loss, any error of its listeners
                errors[g] = err

    def start(g: int, group: Group) -> None:
        for cfg, listeners in zip(group.configs, group.listeners, strict=True):
            for listener in listeners:
                listener.on_start(info, cfg)
        for watcher in group.watchers:
            watcher.on_start(info, group.configs)
        members[g] = [Member(cfg, data, held_out, device) for cfg in group.configs]

    def evaluate(step: int) -> None:
        def work(g: int, group: Group) -> None:
            evaluations = [member.evaluation(step) for member in members[g]]
            for evaluation, listeners in zip(evaluations, group.listeners, strict=True):
                for listener in listeners:
                    listener.on_eval(evaluation)
            for watcher in group.watchers:
                watcher.on_eval_round(step, evaluations)

        each_live(work)

    def log(step: int, seconds: float) -> None:
        def work(g: int, group: Group) -> None:
            values = [member.log_values(seconds) for member in members[g]]
            for member_values, listeners in zip(values, group.listeners, strict=True):
                for listener in listeners:
                    listener.on_log(step, member_values)
            for watcher in group.watchers:
                watcher.on_log_round(step, values)

        each_live(work)

    each_live(start)
    # A step-0 evaluation: the chance-level baseline; it also makes eval/* each run's first metrics,
    # which the MLflow compare view picks by default.
    evaluate(0)
    window_start, window_paused = time.perf_counter(), 0.0
    for step in range(1, shared.steps + 1):
        if len(errors) == len(groups):
            break
        for g, group_members in members.items():
            if g not in errors:
                for member in group_members:
                    member.step()
        if step % shared.log_every == 0 or step == shared.steps:
            log(step, time.perf_counter() - window_start - window_paused)  # evaluations excluded
            window_start, window_paused = time.perf_counter(), 0.0
        if step % shared.eval_every == 0 or step == shared.steps:
            began = time.perf_counter()
            evaluate(step)
            window_paused += time.perf_counter() - began

    seconds = time.perf_counter() - started
    return [
        GroupOutcome([], errors[g])
        if g in errors
        else GroupOutcome(
            [TrainResult(shared.steps, m.last, m.trainer.weights(), info, seconds) for m in members[g]], None
        )
        for g in range(len(groups))
    ]


# What trains groups: `train_pack` in production, a stub only in the engine's stress test.
Trainer = Callable[[Sequence[Group]], list[GroupOutcome]]


def train(cfg: TrainConfig, listeners: Sequence[TrainListener] = ()) -> TrainResult:
    """Train one InfoGAN on `cfg` (a pack of one); all randomness comes from `cfg.seed`. What stops it (a
    diverging loss, a listener's exception) is raised."""
    (outcome,) = train_pack([Group([cfg], [listeners])])
    if outcome.error is not None:
        raise outcome.error
    return outcome.results[0]
