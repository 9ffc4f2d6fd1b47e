"""The training loop on the bundled subset: real steps, determinism, the loss details."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.config import TrainConfig
from harness.latent import LatentSpec
from harness.train import DivergenceError, Evaluation, InfoGANTrainer, TrainListener, train
from tests.conftest import tiny_config


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
    assert all((a.images[k] == b.images[k]).all() for a, b in zip(first.evals, again.evals) for k in a.images)
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


def test_info_loss_reaches_the_shared_trunk_and_the_generator(tiny_cfg: TrainConfig) -> None:
    """λ changes D's trunk after one step (Q trains with D's optimiser) and G's weights."""

    def after_one_step(lambda_cat: float) -> InfoGANTrainer:
        cfg = tiny_cfg.model_copy(update={"loss": tiny_cfg.loss.model_copy(update={"lambda_cat": lambda_cat, "lambda_con": 0.0})})
        torch.manual_seed(0)
        trainer = InfoGANTrainer(cfg, torch.device("cpu"))
        trainer.step(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
        return trainer

    with_info, without_info = after_one_step(1.0), after_one_step(0.0)
    trunk_a, trunk_b = with_info.model.trunk.layers[0].weight, without_info.model.trunk.layers[0].weight
    assert not torch.equal(trunk_a, trunk_b)
    gen_a, gen_b = with_info.model.generator.fc[0].weight, without_info.model.generator.fc[0].weight
    assert not torch.equal(gen_a, gen_b)


def test_cross_entropy_is_taken_on_logits_not_softmax(tiny_cfg: TrainConfig) -> None:
    trainer = InfoGANTrainer(tiny_cfg, torch.device("cpu"))
    spec = trainer.spec
    latent = spec.build(torch.zeros(2, spec.noise), torch.tensor([[0], [3]]), torch.zeros(2, 2))
    q_out = torch.zeros(2, spec.q_dim)
    q_out[0, 0] = q_out[1, 3] = 20.0  # confident and right
    ce, nll = trainer.info_terms(q_out, latent)
    assert ce.item() < 1e-6  # a softmax before the cross-entropy would leave ~1.46 nats
    assert nll.item() == pytest.approx(2 * 0.5 * math.log(2 * math.pi))  # mean 0, log-std 0, code 0


def test_codes_come_from_the_papers_distributions() -> None:
    spec = LatentSpec(noise=62, categorical=(10,), continuous=2)
    latent = spec.sample(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(latent.categories[:, 0], minlength=10).float() / 20000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.01)  # uniform Cat(10)
    assert latent.continuous.min() >= -1 and latent.continuous.max() <= 1  # Unif(-1, 1)
    assert latent.continuous.mean().abs() < 0.02 and latent.continuous.var().sub(1 / 3).abs() < 0.01
    one_hot = latent.vector[:, 62:72]
    assert torch.equal(one_hot.argmax(dim=1), latent.categories[:, 0]) and torch.equal(one_hot.sum(1), torch.ones(20000))


def test_non_finite_losses_raise_divergence(tiny_cfg: TrainConfig) -> None:
    trainer = InfoGANTrainer(tiny_cfg, torch.device("cpu"))
    stats = torch.tensor([float("nan"), 1.0, 1.0, 0.0, 2.0])
    with pytest.raises(DivergenceError, match="non-finite"):
        trainer.window_metrics(stats, 1)


def test_batchnorm_uses_default_eps(tiny_cfg: TrainConfig) -> None:
    model = InfoGANTrainer(tiny_cfg, torch.device("cpu")).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
