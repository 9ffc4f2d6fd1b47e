"""The training loop on the bundled subset: real steps, determinism, the loss details."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import TrainConfig
from harness.evaluate import TRAVERSAL_ROWS, Evaluation, to_grid
from harness.latent import LatentSpec
from harness.metric_names import PROPERTIES, is_logged
from harness.model import InfoGAN
from harness.packed_model import PackedInfoGAN
from harness.train import TrainListener, train
from tests.conftest import tiny_config

PROPERTY_SUFFIXES = ("", *(f"/{name}" for name in PROPERTIES))  # eval/con_rho/c0 and eval/con_rho/c0/slant, ...


class Recorder(TrainListener):
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.evals: list[Evaluation] = []

    def on_log(self, step: int, values: dict[str, float]) -> None:
        self.logs.append((step, values))

    def on_eval(self, evaluation: Evaluation) -> None:
        self.evals.append(evaluation)


def without_timing(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if not k.startswith("perf/")}


def test_short_run_logs_losses_bound_and_evaluations(tiny_cfg: TrainConfig) -> None:
    recorder = Recorder()
    result = train(tiny_cfg, [recorder])
    assert [step for step, _ in recorder.logs] == [3, 6, 9, 12]
    assert [e.step for e in recorder.evals] == [0, 6, 12]
    first = recorder.logs[0][1]
    assert {"loss/d", "loss/g", "loss/info", "info/mi_cat", "info/h_cat", "info/mi_con"} <= set(first)
    assert first["info/h_cat"] == pytest.approx(math.log(10))
    assert first["info/mi_cat"] <= math.log(10)
    evaluation = recorder.evals[-1]
    assert 0.0 <= evaluation.metrics["eval/cat_acc"] <= 1.0
    assert evaluation.metrics["eval/cat_acc"] <= evaluation.metrics["eval/cat_acc_majority"] + 1e-9
    assert 1 <= evaluation.metrics["eval/digits_covered"] <= 10
    assert 0.1 <= evaluation.metrics["eval/gen_purity"] <= 1.0  # each category's majority digit: at least 1 in 10
    assert 1 <= evaluation.metrics["eval/gen_digits_covered"] <= 10 and evaluation.metrics["eval/fld"] > 0
    continuous = {f"eval/{side}_rho/c{j}{prop}" for side in ("con", "q") for j in (0, 1) for prop in PROPERTY_SUFFIXES}
    assert continuous | {"eval/con_gap"} <= set(evaluation.metrics)
    assert (
        all(-1 <= evaluation.metrics[key] <= 1 for key in continuous) and 0 <= evaluation.metrics["eval/con_gap"] <= 1
    )
    assert all(is_logged(key) for key in evaluation.metrics) and len(evaluation.metrics) == 6 + 2 * 2 * 4 + 1
    assert set(evaluation.images) == {"cat0", "con0", "con1"}
    assert evaluation.images["cat0"].shape == (8 * 30 + 2, 10 * 30 + 2, 3)  # 8 rows x 10 categories
    assert evaluation.images["cat0"].dtype.name == "uint8"
    assert result.info.data_source == "bundled-10k" and result.steps == 12
    assert set(result.weights) == {"generator", "trunk", "d_head", "q_head", "latent"}


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_cfg: TrainConfig) -> None:
    first, again = Recorder(), Recorder()
    train(tiny_cfg, [first])
    train(tiny_cfg, [again])
    assert [without_timing(v) for _, v in first.logs] == [without_timing(v) for _, v in again.logs]
    assert [e.metrics for e in first.evals] == [e.metrics for e in again.evals]
    assert all(
        (a.images[k] == b.images[k]).all() for a, b in zip(first.evals, again.evals, strict=True) for k in a.images
    )
    other = Recorder()
    train(tiny_cfg.model_copy(update={"seed": 1}), [other])
    assert without_timing(other.logs[-1][1]) != without_timing(first.logs[-1][1])


def test_several_categorical_codes_get_per_code_metrics(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "codes.categorical=[10, 3]", "codes.continuous=0", "steps=6")
    recorder = Recorder()
    train(cfg, [recorder])
    values = recorder.evals[-1].metrics
    assert {"eval/cat_acc/c0", "eval/cat_acc/c1", "eval/digits_covered/c1"} <= set(values)
    assert values["eval/cat_acc"] == max(values["eval/cat_acc/c0"], values["eval/cat_acc/c1"])
    assert recorder.logs[-1][1]["info/h_cat"] == pytest.approx(math.log(10) + math.log(3))
    assert "info/mi_con" not in recorder.logs[-1][1] and set(recorder.evals[-1].images) == {"cat0", "cat1"}


def test_a_short_training_with_q_on_gs_optimiser_runs(tmp_path: Path) -> None:
    recorder = Recorder()
    result = train(tiny_config(tmp_path, "optim.q_optimizer=g", "steps=6"), [recorder])
    assert [step for step, _ in recorder.logs] == [3, 6] and [e.step for e in recorder.evals] == [0, 6]
    assert all(math.isfinite(v) for _, values in recorder.logs for v in values.values())
    assert {"loss/info", "info/mi_cat", "info/mi_con"} <= set(recorder.logs[-1][1])
    assert 0.0 <= result.metrics["eval/cat_acc"] <= 1.0


def test_codes_come_from_the_papers_distributions() -> None:
    spec = LatentSpec(noise=62, categorical=(10,), continuous=2)
    latent = spec.sample(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(latent.categories[:, 0], minlength=10).float() / 20000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.01)  # uniform Cat(10)
    assert latent.continuous.min() >= -1 and latent.continuous.max() <= 1  # Unif(-1, 1)
    assert latent.continuous.mean().abs() < 0.02 and latent.continuous.var().sub(1 / 3).abs() < 0.01
    one_hot = latent.vector[:, 62:72]
    assert torch.equal(one_hot.argmax(dim=1), latent.categories[:, 0]) and torch.equal(
        one_hot.sum(1), torch.ones(20000)
    )


def test_batchnorm_uses_default_eps(tiny_cfg: TrainConfig) -> None:
    spec = LatentSpec.from_config(tiny_cfg.codes)
    for model in (InfoGAN(spec.dim, spec.q_dim), PackedInfoGAN(2, spec.dim, spec.q_dim)):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.eps == 1e-5 for m in norms)


def test_a_traversal_grid_is_torchvisions_make_grid() -> None:
    """`to_grid` lays images out as torchvision's make_grid (padding 2, white), without importing it at run time."""
    from torchvision.utils import make_grid  # here only: the test modules import no torchvision otherwise

    images = torch.rand(TRAVERSAL_ROWS * 10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images[0] = 0.0  # a black image shows where the padding is
    expected = make_grid(images, nrow=10, padding=2, pad_value=1.0).mul(255).round().byte().permute(1, 2, 0)
    assert np.array_equal(to_grid(images), expected.numpy())
