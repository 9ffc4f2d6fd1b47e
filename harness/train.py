"""Train one InfoGAN: `train(cfg, listeners) -> TrainResult`. Knows neither MLflow nor Optuna:
each log window and each evaluation goes to the listeners."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from harness import metrics
from harness.config import TrainConfig
from harness.data import Dataset, load_dataset
from harness.latent import Latent, LatentSpec
from harness.model import InfoGAN

TRAVERSAL_ROWS = 8
TRAVERSAL_RANGE = (-2.0, 2.0)  # the paper's range for continuous codes
TRAVERSAL_COLUMNS = 10
EVAL_CHUNK = 1000


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
class Evaluation:
    step: int
    metrics: dict[str, float]
    images: dict[str, np.ndarray] = field(repr=False)  # name -> (H, W, 3) uint8 grid


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


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).float().div_(255)  # (B, 28, 28) uint8 -> (B, 1, 28, 28) in [0, 1]


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


class Evaluator:
    """Q's codes on the held-out labelled images, and traversal grids from fixed latents."""

    def __init__(self, spec: LatentSpec, data: Dataset, seed: int, device: torch.device) -> None:
        self.spec, self.data = spec, data
        self.labels = data.test_labels.cpu().numpy()
        rng = torch.Generator(device).manual_seed(seed + 1)
        base = spec.sample(TRAVERSAL_ROWS, rng, device)
        self.traversals: dict[str, torch.Tensor] = {}
        for i, k in enumerate(spec.categorical):  # rows: noise samples, columns: the K categories
            cats = base.categories.repeat_interleave(k, dim=0)
            cats[:, i] = torch.arange(k, device=device).repeat(TRAVERSAL_ROWS)
            noise = base.vector[:, : spec.noise].repeat_interleave(k, dim=0)
            con = torch.zeros(len(cats), spec.continuous, device=device)
            self.traversals[f"cat{i}"] = spec.build(noise, cats, con).vector
        values = torch.linspace(*TRAVERSAL_RANGE, TRAVERSAL_COLUMNS, device=device)
        for j in range(spec.continuous):  # rows: noise samples (first code's category = row), columns: values
            noise = base.vector[:, : spec.noise].repeat_interleave(TRAVERSAL_COLUMNS, dim=0)
            cats = base.categories.clone()
            if spec.categorical:
                cats[:, 0] = torch.arange(TRAVERSAL_ROWS, device=device) % spec.categorical[0]
            cats = cats.repeat_interleave(TRAVERSAL_COLUMNS, dim=0)
            con = torch.zeros(len(noise), spec.continuous, device=device)
            con[:, j] = values.repeat(TRAVERSAL_ROWS)
            self.traversals[f"con{j}"] = spec.build(noise, cats, con).vector

    @torch.no_grad()
    def __call__(self, model: InfoGAN, step: int) -> Evaluation:
        model.eval()  # running BatchNorm statistics, not the test batch's
        n_logits = sum(self.spec.categorical)
        chunks = []
        for images in self.data.test_images.split(EVAL_CHUNK):
            _, q_out = model.discriminate(as_float_images(images))
            logits = q_out[:, :n_logits].float().split(list(self.spec.categorical), dim=1)
            chunks.append(torch.stack([code.argmax(dim=1) for code in logits], dim=1))
        values: dict[str, float] = {}
        if self.spec.categorical:
            codes = torch.cat(chunks).cpu().numpy()  # (M, n_categorical)
            per_code = [self.code_metrics(codes[:, i]) for i in range(codes.shape[1])]
            best = max(per_code, key=lambda m: m["eval/cat_acc"])
            values.update(best)
            if len(per_code) > 1:
                for i, code_values in enumerate(per_code):
                    values.update({f"{name}/c{i}": v for name, v in code_values.items()})
        images = {name: to_grid(model.generator(latent)) for name, latent in self.traversals.items()}
        model.train()
        return Evaluation(step, values, images)

    def code_metrics(self, codes: np.ndarray) -> dict[str, float]:
        majority, covered = metrics.majority_accuracy(codes, self.labels)
        return {
            "eval/cat_acc": metrics.hungarian_accuracy(codes, self.labels),
            "eval/cat_acc_majority": majority,
            "eval/digits_covered": float(covered),
        }


def to_grid(images: torch.Tensor) -> np.ndarray:
    """(R·C, 1, 28, 28) in [0, 1] -> (H, W, 3) uint8, C images a row."""
    columns = len(images) // TRAVERSAL_ROWS
    grid = make_grid(images.float(), nrow=columns, padding=2, pad_value=1.0)  # (3, H, W)
    return grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def train(cfg: TrainConfig, listeners: Sequence[TrainListener] = ()) -> TrainResult:
    """Train an InfoGAN on `cfg`; all randomness comes from `cfg.seed`."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data).to(device)
    info = RunInfo(str(device), data.source, data.location, len(data.train_images), len(data.test_images))
    for listener in listeners:
        listener.on_start(info, cfg)

    trainer = InfoGANTrainer(cfg, device)
    evaluate = Evaluator(trainer.spec, data, cfg.seed, device)
    batch_rng = torch.Generator(device).manual_seed(cfg.seed + 2)
    batch_size = min(cfg.optim.batch_size, len(data.train_images))
    order = torch.empty(0, dtype=torch.long, device=device)
    last: dict[str, float] = {}

    def evaluate_and_publish(step: int) -> float:
        """Evaluate, hand the result to the listeners; returns the seconds it took."""
        began = time.perf_counter()
        evaluation = evaluate(trainer.model, step)
        last.update(evaluation.metrics)
        for listener in listeners:
            listener.on_eval(evaluation)
        return time.perf_counter() - began

    # A step-0 evaluation: the chance-level baseline; it also makes eval/* each run's first
    # metrics, which the MLflow compare view picks by default.
    evaluate_and_publish(0)
    window, window_steps, window_start, window_paused = None, 0, time.perf_counter(), 0.0
    for step in range(1, cfg.steps + 1):
        if len(order) < batch_size:  # a new epoch, the last partial batch dropped
            order = torch.randperm(len(data.train_images), generator=batch_rng, device=device)
        index, order = order[:batch_size], order[batch_size:]
        stats = trainer.step(as_float_images(data.train_images[index]))
        window = stats if window is None else window + stats
        window_steps += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            values = trainer.window_metrics(window, window_steps)
            seconds = time.perf_counter() - window_start - window_paused  # evaluations excluded
            values["perf/images_per_s"] = window_steps * batch_size / seconds
            last.update(values)
            for listener in listeners:
                listener.on_log(step, values)
            window, window_steps, window_start, window_paused = None, 0, time.perf_counter(), 0.0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            window_paused += evaluate_and_publish(step)

    return TrainResult(cfg.steps, last, trainer.weights(), info, time.perf_counter() - started)
