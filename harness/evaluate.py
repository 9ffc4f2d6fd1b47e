"""One evaluation of an InfoGAN: Q's categorical codes against the held-out labels, the continuous codes
against measured stroke properties, sample quality through the shipped digit classifier, and traversal
grids. Every generated image comes from latents fixed at the start, so evaluations compare across steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from harness import metrics
from harness.classifier import load_classifier
from harness.data import Dataset
from harness.latent import Latent, LatentSpec
from harness.metric_names import PROPERTIES
from harness.model import InfoGAN
from harness.morphology import measure_digits

EVAL_CHUNK = 1000  # images a forward pass takes at once
TRAVERSAL_ROWS = 8
TRAVERSAL_COLUMNS = 10
TRAVERSAL_RANGE = (-2.0, 2.0)  # the paper's range for continuous codes
GRID_PADDING = 2  # white pixels around each image of a grid, as torchvision's make_grid
# eval/con_rho: each continuous code swept over SWEEP_VALUES values on SWEEP_ROWS fixed latents. More rows,
# not more values, steady ρ (benchmarks/README.md: ±0.05 at 32 x 5, ~0.1 s of measuring a code).
SWEEP_ROWS = 32
SWEEP_VALUES = 5
QUALITY_IMAGES = 500  # drawn from the prior for eval/fld and eval/gen_purity (~50 a category of a 10-way code)


@dataclass(frozen=True)
class Evaluation:
    step: int
    metrics: dict[str, float]
    images: dict[str, np.ndarray] = field(repr=False)  # name -> (H, W, 3) uint8 grid


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).float().div_(255)  # (B, 28, 28) uint8 -> (B, 1, 28, 28) in [0, 1]


class HeldOut:
    """The held-out split and what evaluation needs of it that never changes: the labels, the shipped
    classifier's features of the digits and, for continuous codes, their stroke properties. Computed once
    and shared by every model evaluated on that split."""

    def __init__(self, data: Dataset, device: torch.device, with_properties: bool) -> None:
        self.images = data.test_images  # (M, 28, 28) uint8 on `device`
        self.labels = data.test_labels.cpu().numpy()  # (M,)
        self.classifier = load_classifier(device)
        self.features = np.concatenate([self.classify(as_float_images(chunk))[0] for chunk in self.chunks()])
        self.properties = measure_digits(self.images.cpu().numpy()) if with_properties else None  # (M, 3)

    def chunks(self) -> tuple[torch.Tensor, ...]:
        return self.images.split(EVAL_CHUNK)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 1, 28, 28) in [0, 1] -> the classifier's features (B, 84) and digits (B,), in fp32."""
        features, logits = self.classifier.features(images.float())
        return features.cpu().numpy(), logits.argmax(dim=1).cpu().numpy()


HELD_OUT: dict[tuple[str, str, int, str, bool], HeldOut] = {}  # held_out_for's: one per split and device


def held_out_for(data: Dataset, device: torch.device, with_properties: bool) -> HeldOut:
    """The split's HeldOut, computed once per process: a sweep's trials, and a pack's members, share it."""
    key = (data.source, data.location, len(data.test_images), str(device), with_properties)
    if key not in HELD_OUT:
        HELD_OUT[key] = HeldOut(data, device, with_properties)
    return HELD_OUT[key]


class Evaluator:
    """Measures one model at a step, on latents fixed here from the model's seed."""

    def __init__(self, spec: LatentSpec, held_out: HeldOut, seed: int, device: torch.device) -> None:
        self.spec, self.held_out = spec, held_out
        rng = torch.Generator(device).manual_seed(seed + 1)
        self.traversals = traversal_latents(spec, spec.sample(TRAVERSAL_ROWS, rng, device))
        self.sweeps = sweep_latents(spec, spec.sample(SWEEP_ROWS, rng, device))
        self.quality = spec.sample(QUALITY_IMAGES, rng, device)
        self.sweep_values = np.linspace(*TRAVERSAL_RANGE, SWEEP_VALUES)

    @torch.no_grad()
    def __call__(self, model: InfoGAN, step: int) -> Evaluation:
        model.eval()  # running BatchNorm statistics, not the batch's
        n_logits = sum(self.spec.categorical)
        q_out = torch.cat(
            [model.discriminate(as_float_images(chunk))[1].float() for chunk in self.held_out.chunks()]
        )  # (M, q_dim): logits per categorical code, then means and log-stds of the continuous codes
        values = self.categorical_metrics(q_out[:, :n_logits])
        values |= self.quality_metrics(model)
        if self.spec.continuous:
            q_means = q_out[:, n_logits : n_logits + self.spec.continuous].cpu().numpy()  # (M, J)
            values |= self.continuous_metrics(model, q_means)
        images = {name: to_grid(model.generator(latent.vector)) for name, latent in self.traversals.items()}
        model.train()
        return Evaluation(step, values, images)

    def categorical_metrics(self, logits: torch.Tensor) -> dict[str, float]:
        """Q's argmax of each categorical code against the labels; the unsuffixed names are the best code's."""
        codes = [code.argmax(dim=1).cpu().numpy() for code in logits.split(list(self.spec.categorical), dim=1)]
        per_code = []
        for code in codes:  # (M,) each
            majority, covered = metrics.majority_accuracy(code, self.held_out.labels)
            accuracy = metrics.hungarian_accuracy(code, self.held_out.labels)
            per_code.append(
                {"eval/cat_acc": accuracy, "eval/cat_acc_majority": majority, "eval/digits_covered": float(covered)}
            )
        return best_and_per_code(per_code, "eval/cat_acc")

    def quality_metrics(self, model: InfoGAN) -> dict[str, float]:
        """Fréchet distance of the classifier's features of generated and held-out images, and how purely
        each categorical code's categories draw one digit."""
        images = torch.cat([model.generator(chunk) for chunk in self.quality.vector.split(EVAL_CHUNK)])
        features, digits = self.held_out.classify(images)
        values = {"eval/fld": metrics.frechet_distance(features, self.held_out.features)}
        per_code = []
        for categories in self.quality.categories.cpu().numpy().T:  # (N,) per categorical code
            purity, covered = metrics.generated_purity(categories, digits)
            per_code.append({"eval/gen_purity": purity, "eval/gen_digits_covered": float(covered)})
        return values | best_and_per_code(per_code, "eval/gen_purity")

    def continuous_metrics(self, model: InfoGAN, q_means: np.ndarray) -> dict[str, float]:
        """Spearman ρ of each continuous code with slant, thickness and width: swept in generated images,
        and as Q reads it from the held-out digits; the exclusivity gap."""
        con_rho = []
        for latent in self.sweeps:  # one per code: (SWEEP_ROWS · SWEEP_VALUES, dim), row-major
            images = model.generator(latent.vector).squeeze(1).float().cpu().numpy()
            properties = measure_digits(images).reshape(SWEEP_ROWS, SWEEP_VALUES, len(PROPERTIES))
            con_rho.append(metrics.sweep_spearman(self.sweep_values, properties))
        assert self.held_out.properties is not None, "HeldOut measures the properties for continuous codes"
        q_rho = metrics.spearman_matrix(q_means, self.held_out.properties)
        return metrics.continuous_code_metrics(np.stack(con_rho), q_rho, PROPERTIES)


def best_and_per_code(per_code: list[dict[str, float]], key: str) -> dict[str, float]:
    """The best code's values (by `key`) under the plain names, and with several codes each under `<name>/c<i>`."""
    if not per_code:
        return {}
    values = dict(max(per_code, key=lambda code: code[key]))
    if len(per_code) > 1:
        for i, code in enumerate(per_code):
            values |= {f"{name}/c{i}": value for name, value in code.items()}
    return values


def traversal_latents(spec: LatentSpec, base: Latent) -> dict[str, Latent]:
    """The grids' latents, rows the base samples: `cat<i>` sweeps code i over its categories (columns),
    `con<j>` sweeps continuous code j over TRAVERSAL_RANGE with the first code's category = the row."""
    rows, noise = len(base.vector), base.vector[:, : spec.noise]
    grids = {}
    for i, k in enumerate(spec.categorical):
        cats = base.categories.repeat_interleave(k, dim=0)
        cats[:, i] = torch.arange(k, device=cats.device).repeat(rows)
        con = torch.zeros(len(cats), spec.continuous, device=cats.device)
        grids[f"cat{i}"] = spec.build(noise.repeat_interleave(k, dim=0), cats, con)
    values = torch.linspace(*TRAVERSAL_RANGE, TRAVERSAL_COLUMNS, device=noise.device)
    cats = base.categories.clone()
    if spec.categorical:
        cats[:, 0] = torch.arange(rows, device=cats.device) % spec.categorical[0]
    for j in range(spec.continuous):
        con = torch.zeros(rows * TRAVERSAL_COLUMNS, spec.continuous, device=noise.device)
        con[:, j] = values.repeat(rows)
        grids[f"con{j}"] = spec.build(
            noise.repeat_interleave(TRAVERSAL_COLUMNS, dim=0), cats.repeat_interleave(TRAVERSAL_COLUMNS, dim=0), con
        )
    return grids


def sweep_latents(spec: LatentSpec, base: Latent) -> list[Latent]:
    """For each continuous code j: the base samples (rows), each with code j at SWEEP_VALUES values over
    TRAVERSAL_RANGE and the other continuous codes at 0, row-major."""
    rows = len(base.vector)
    values = torch.linspace(*TRAVERSAL_RANGE, SWEEP_VALUES, device=base.vector.device)
    noise = base.vector[:, : spec.noise].repeat_interleave(SWEEP_VALUES, dim=0)
    cats = base.categories.repeat_interleave(SWEEP_VALUES, dim=0)
    sweeps = []
    for j in range(spec.continuous):
        con = torch.zeros(rows * SWEEP_VALUES, spec.continuous, device=noise.device)
        con[:, j] = values.repeat(rows)
        sweeps.append(spec.build(noise, cats, con))
    return sweeps


def to_grid(images: torch.Tensor) -> np.ndarray:
    """(R·C, 1, 28, 28) in [0, 1] -> (H, W, 3) uint8, C images a row on a white background: torchvision's
    `make_grid(images, nrow=C, padding=2, pad_value=1)`, without importing torchvision (1.6 s of a worker's start)."""
    columns = len(images) // TRAVERSAL_ROWS
    rows, height, width, pad = TRAVERSAL_ROWS, images.shape[-2], images.shape[-1], GRID_PADDING
    tiles = torch.ones(rows, columns, height + pad, width + pad)  # each image with the padding above and left of it
    tiles[:, :, pad:, pad:] = images.float().cpu().view(rows, columns, height, width)
    grid = torch.ones(rows * (height + pad) + pad, columns * (width + pad) + pad)  # and one more row, column
    grid[:-pad, :-pad] = tiles.permute(0, 2, 1, 3).reshape(rows * (height + pad), columns * (width + pad))
    gray = grid.mul(255).round().byte().numpy()  # (H, W)
    return np.repeat(gray[:, :, None], 3, axis=2)
