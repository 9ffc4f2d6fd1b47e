"""What measuring digit morphology costs, and how many rows x values a stable sweep ρ needs.

    .venv/bin/python benchmarks/morphology_cost.py [--weights PATH/model/weights.pt] [--seeds 8]

1. Seconds for `measure_digits` on the held-out split (the bundled 1,996 test digits; an
   evaluation needs it once per run).
2. Seconds for one evaluation's generated grids: for each continuous code, rows x values images
   (code swept over -2..2, noise, categories and the other codes held), measured and reduced to
   ρ per property by `sweep_spearman`. With --weights the images come from that generator (a
   run's `model/weights.pt`); without, held-out digits stand in for them (the cost is the
   measuring).
3. With --weights only: for each grid size, the spread over --seeds independent latent batches
   of each code's within-row ρ (`sweep_spearman`, what is logged) next to the pooled ρ of the
   same images (`spearman_matrix` over all rows), and the metrics one evaluation would log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch

from harness import metrics
from harness.data import bundled_mnist_folder, read_split_folder
from harness.evaluate import TRAVERSAL_RANGE
from harness.latent import LatentSpec
from harness.metric_names import PROPERTIES
from harness.model import InfoGAN
from harness.morphology import measure_digits

# (rows, values); 8 x 10 is the size of the traversal grids the trainer logs as images
GRIDS = ((8, 10), (16, 5), (16, 10), (32, 5), (32, 10), (64, 5), (64, 10))
CHOSEN_GRID = (32, 5)  # what benchmarks/README.md recommends to the trainer


def median_seconds(repeats: int, work: Callable[..., object], *args: object) -> tuple[float, float]:
    """The median wall and CPU seconds of `work(*args)` over `repeats` calls (on a shared machine
    the CPU seconds are the steadier figure)."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work(*args)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    wall, cpu = np.median(times, axis=0)
    return float(wall), float(cpu)


def load_model(path: Path) -> tuple[InfoGAN, LatentSpec]:
    """A run's `model/weights.pt` (state dicts + latent layout) -> the model in eval mode."""
    weights = torch.load(path, weights_only=True)
    layout = weights["latent"]
    spec = LatentSpec(layout["noise"], tuple(layout["categorical"]), layout["continuous"])
    model = InfoGAN(spec.dim, spec.q_dim)
    for part in ("generator", "trunk", "d_head", "q_head"):
        getattr(model, part).load_state_dict(weights[part])
    return model.eval(), spec


@torch.no_grad()
def sweep_images(model: InfoGAN, spec: LatentSpec, code: int, rows: int, values: torch.Tensor, seed: int) -> np.ndarray:
    """(rows·V, 28, 28) float images, row r = one noise and category draw, column v = values[v]
    for continuous code `code`, the other codes 0 (row-major, as the traversal grids)."""
    base = spec.sample(rows, torch.Generator().manual_seed(seed), torch.device("cpu"))
    columns = len(values)
    noise = base.vector[:, : spec.noise].repeat_interleave(columns, dim=0)
    categories = base.categories.repeat_interleave(columns, dim=0)
    continuous = torch.zeros(rows * columns, spec.continuous)
    continuous[:, code] = values.repeat(rows)
    return model.generator(spec.build(noise, categories, continuous).vector).squeeze(1).numpy()


def sweep_grids(model: InfoGAN, spec: LatentSpec, rows: int, values: torch.Tensor, seed: int) -> list[np.ndarray]:
    """One evaluation's generated images: a (rows·V, 28, 28) sweep for each continuous code."""
    return [sweep_images(model, spec, code, rows, values, seed) for code in range(spec.continuous)]


def sweep_properties(images: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(R·V, 28, 28) row-major sweep images -> (R, V, P) properties."""
    return measure_digits(images).reshape(-1, len(values), len(PROPERTIES))


def evaluation_rho(grids: list[np.ndarray], values: np.ndarray) -> np.ndarray:
    """What an evaluation does with its generated grids: (J, P) con_rho."""
    return np.array([metrics.sweep_spearman(values, sweep_properties(grid, values)) for grid in grids])


def pooled_rho(properties: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(R, V, P) -> (P,) ρ of the code value with each property over all R·V images at once."""
    codes = np.tile(values, len(properties))[:, None]  # (R·V, 1)
    return metrics.spearman_matrix(codes, properties.reshape(-1, properties.shape[2]))[0]


def spread(samples: np.ndarray) -> str:
    return f"{samples.mean():+.2f}±{samples.std():.2f}"


@torch.no_grad()
def q_means(model: InfoGAN, spec: LatentSpec, images: np.ndarray) -> np.ndarray:
    """(M, 28, 28) uint8 -> (M, J) Q's mean of each continuous code."""
    q_out = model.discriminate(torch.from_numpy(images).unsqueeze(1).float().div(255))[1]  # (M, q_dim)
    n_logits = sum(spec.categorical)  # then J means, then J log-stds
    return q_out[:, n_logits : n_logits + spec.continuous].numpy()


@click.command()
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--seeds", default=12, show_default=True, help="latent batches per grid for the spread of ρ")
@click.option("--repeats", default=5, show_default=True, help="timed repeats (the median is printed)")
@click.option("--codes", default=2, show_default=True, help="continuous codes when there are no --weights")
def main(weights: Path | None, seeds: int, repeats: int, codes: int) -> None:
    torch.set_grad_enabled(False)
    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    held_out = data.test_images.numpy()  # (1996, 28, 28) uint8
    click.echo(f"torch threads {torch.get_num_threads()}; properties {PROPERTIES}")
    wall, cpu = median_seconds(repeats, measure_digits, held_out)
    click.echo(
        f"held-out split: {len(held_out)} digits measured in {wall:.2f} s wall, {cpu:.2f} s CPU "
        f"({1e3 * cpu / len(held_out):.2f} ms CPU a digit; median of {repeats})"
    )

    model, spec = load_model(weights) if weights else (None, None)
    n_codes = spec.continuous if spec else codes
    click.echo(f"\none evaluation's generated grids, {n_codes} codes (median of {repeats}; seconds wall / CPU):")
    click.echo(" rows values images     generate    measure+rho")
    for rows, columns in GRIDS:
        values = torch.linspace(*TRAVERSAL_RANGE, columns)
        if model is None:
            grids = [held_out[: rows * columns] for _ in range(n_codes)]
            generate = (0.0, 0.0)
        else:
            assert spec is not None
            generate = median_seconds(repeats, sweep_grids, model, spec, rows, values, 0)
            grids = sweep_grids(model, spec, rows, values, 0)
        measure = median_seconds(repeats, evaluation_rho, grids, values.numpy())
        timings = f"{generate[0]:5.2f} / {generate[1]:5.2f}  {measure[0]:5.2f} / {measure[1]:5.2f}"
        click.echo(f" {rows:4d} {columns:6d} {n_codes * rows * columns:6d}  {timings}")
    if model is None or spec is None:
        return

    click.echo(f"\nρ of each code with each property over {seeds} latent batches: mean ± std (within-row | pooled)")
    for rows, columns in GRIDS:
        values = torch.linspace(*TRAVERSAL_RANGE, columns)
        for j in range(spec.continuous):
            grids = [sweep_images(model, spec, j, rows, values, 1000 + s) for s in range(seeds)]
            properties = [sweep_properties(grid, values.numpy()) for grid in grids]  # (R, V, P) each
            within = np.array([metrics.sweep_spearman(values.numpy(), p) for p in properties])  # (seeds, P)
            pooled = np.array([pooled_rho(p, values.numpy()) for p in properties])
            cells = "  ".join(
                f"{name} {spread(within[:, p])} | {spread(pooled[:, p])}" for p, name in enumerate(PROPERTIES)
            )
            click.echo(f" {rows:3d}x{columns:<3d} c{j}: {cells}")

    rows, columns = CHOSEN_GRID
    values = torch.linspace(*TRAVERSAL_RANGE, columns)
    con_rho = evaluation_rho(sweep_grids(model, spec, rows, values, 0), values.numpy())  # (J, P)
    q_rho = metrics.spearman_matrix(q_means(model, spec, held_out), measure_digits(held_out))
    click.echo(f"\nthe metrics one evaluation would log ({rows} rows x {columns} values):")
    for key, value in metrics.continuous_code_metrics(con_rho, q_rho, PROPERTIES).items():
        click.echo(f" {key} {value:+.3f}")


if __name__ == "__main__":
    main()
