"""The training loop on the bundled subset: real steps, determinism, the loss details."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.config import TrainConfig
from harness.evaluate import Evaluation
from harness.latent import Latent, LatentSpec
from harness.metric_names import PROPERTIES, is_logged
from harness.train import DivergenceError, InfoGANTrainer, TrainListener, train
from tests.conftest import tiny_config

CPU = torch.device("cpu")
PARTS = ("generator", "trunk", "d_head", "q_head")  # InfoGAN's modules
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


def fresh_trainer(cfg: TrainConfig) -> InfoGANTrainer:
    """A trainer whose initial weights depend on nothing but the seed 0."""
    torch.manual_seed(0)
    return InfoGANTrainer(cfg, CPU)


def one_batch(trainer: InfoGANTrainer) -> tuple[torch.Tensor, Latent]:
    """The same 16 real images (B, 1, 28, 28) and latents for every trainer."""
    real = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return real, trainer.spec.sample(16, torch.Generator().manual_seed(1), CPU)


def parameters(trainer: InfoGANTrainer) -> dict[str, list[torch.Tensor]]:
    """A copy of each module's parameters (not BatchNorm's running statistics, which every forward moves)."""
    return {part: [p.detach().clone() for p in getattr(trainer.model, part).parameters()] for part in PARTS}


def moved(before: dict[str, list[torch.Tensor]], after: dict[str, list[torch.Tensor]]) -> set[str]:
    """The modules whose parameters changed."""
    return {
        part for part in PARTS if any(not torch.equal(a, b) for a, b in zip(before[part], after[part], strict=True))
    }


@pytest.mark.parametrize("q_optimizer", ["d", "g"])
def test_info_loss_reaches_the_shared_trunk_in_the_d_step(tmp_path: Path, q_optimizer: str) -> None:
    """From one state and batch, λ changes the gradient D's step leaves on the shared trunk, whichever
    optimiser steps Q's head."""

    def trunk_gradient(lambda_cat: float) -> torch.Tensor:
        overrides = (f"loss.lambda_cat={lambda_cat}", "loss.lambda_con=0", f"optim.q_optimizer={q_optimizer}")
        trainer = fresh_trainer(tiny_config(tmp_path, *overrides))
        real, latent = one_batch(trainer)
        trainer.step_d(real, trainer.model.generator(latent.vector), latent)
        grad = trainer.model.trunk.layers[0].weight.grad  # (64, 1, 4, 4)
        assert grad is not None
        return grad

    assert not torch.equal(trunk_gradient(1.0), trunk_gradient(0.0))


def test_info_loss_reaches_the_generator_from_one_d_state(tmp_path: Path) -> None:
    """Two G steps from the same weights (D and Q after one D step, G) and the same fakes: λ changes
    G's gradient, and D's weights stay."""
    with_info = fresh_trainer(tiny_config(tmp_path, "loss.lambda_cat=1.0", "loss.lambda_con=0"))
    real, latent = one_batch(with_info)
    fake = with_info.model.generator(latent.vector)  # (16, 1, 28, 28), its graph reaching G
    with_info.step_d(real, fake, latent)
    without_info = InfoGANTrainer(tiny_config(tmp_path, "loss.lambda_cat=0.0", "loss.lambda_con=0"), CPU)
    without_info.model.load_state_dict(with_info.model.state_dict())
    same_fake = without_info.model.generator(latent.vector)  # training-mode BatchNorm: the batch's statistics
    assert torch.equal(same_fake, fake)

    before = parameters(with_info)
    with_info.step_g(fake, latent)
    without_info.step_g(same_fake, latent)
    assert moved(before, parameters(with_info)) == moved(before, parameters(without_info)) == {"generator"}
    grads = [trainer.model.generator.fc[0].weight.grad for trainer in (with_info, without_info)]  # (1024, 74)
    assert grads[0] is not None and grads[1] is not None
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("q_optimizer", ["d", "g"])
def test_q_head_steps_with_the_chosen_optimiser(tmp_path: Path, q_optimizer: str) -> None:
    """`optim.q_optimizer`: Q's head moves in D's step (`d`) or in G's (`g`), never in both."""
    trainer = fresh_trainer(tiny_config(tmp_path, f"optim.q_optimizer={q_optimizer}"))
    real, latent = one_batch(trainer)
    fake = trainer.model.generator(latent.vector)
    start = parameters(trainer)
    trainer.step_d(real, fake, latent)
    after_d = parameters(trainer)
    trainer.step_g(fake, latent)
    q_in_d = {"q_head"} if q_optimizer == "d" else set()
    assert moved(start, after_d) == {"trunk", "d_head", *q_in_d}
    assert moved(after_d, parameters(trainer)) == {"generator", *({"q_head"} - q_in_d)}


def test_a_short_training_with_q_on_gs_optimiser_runs(tmp_path: Path) -> None:
    recorder = Recorder()
    result = train(tiny_config(tmp_path, "optim.q_optimizer=g", "steps=6"), [recorder])
    assert [step for step, _ in recorder.logs] == [3, 6] and [e.step for e in recorder.evals] == [0, 6]
    assert all(math.isfinite(v) for _, values in recorder.logs for v in values.values())
    assert {"loss/info", "info/mi_cat", "info/mi_con"} <= set(recorder.logs[-1][1])
    assert 0.0 <= result.metrics["eval/cat_acc"] <= 1.0


def test_cross_entropy_is_taken_on_logits_not_softmax(tiny_cfg: TrainConfig) -> None:
    trainer = InfoGANTrainer(tiny_cfg, torch.device("cpu"))
    spec = trainer.spec
    latent = spec.build(torch.zeros(2, spec.noise), torch.tensor([[0], [3]]), torch.zeros(2, 2))
    q_out = torch.zeros(2, spec.q_dim)
    q_out[0, 0] = q_out[1, 3] = 20.0  # confident and right
    ce, nll = trainer.info_terms(q_out, latent)
    assert ce.item() < 1e-6  # a softmax before the cross-entropy would leave ~1.46 nats
    assert nll.item() == pytest.approx(2 * 0.5 * math.log(2 * math.pi))  # mean 0, log-std 0, code 0


def test_fixed_std_takes_log_std_as_zero(tmp_path: Path) -> None:
    """`loss.continuous_std=fixed`: Q's log-std outputs, here far from 0, leave the NLL at σ = 1."""
    fixed = InfoGANTrainer(tiny_config(tmp_path, "loss.continuous_std=fixed"), CPU)
    learned = InfoGANTrainer(tiny_config(tmp_path), CPU)
    spec = fixed.spec  # 10 logits, then 2 means and 2 log-stds
    codes = [[0.5, -0.25], [-1.0, 0.75]]
    means = [[0.1, 0.3], [-0.5, 0.0]]
    log_stds = [[0.7, -1.2], [2.0, -0.4]]
    latent = spec.build(torch.zeros(2, spec.noise), torch.tensor([[1], [2]]), torch.tensor(codes))
    q_out = torch.cat([torch.zeros(2, 10), torch.tensor(means), torch.tensor(log_stds)], dim=1)  # (2, 14)

    half_log_2pi = 0.5 * math.log(2 * math.pi)
    # ½(c - μ)² per code (|c - μ|: 0.4 and 0.55, then 0.5 and 0.75) and ½·log 2π, summed over codes, batch mean
    by_hand_fixed = ((0.5 * 0.4**2 + 0.5 * 0.55**2) + (0.5 * 0.5**2 + 0.5 * 0.75**2)) / 2 + 2 * half_log_2pi
    by_hand_learned = (
        sum(
            0.5 * ((c - m) / math.exp(s)) ** 2 + s + half_log_2pi
            for row in range(2)
            for c, m, s in zip(codes[row], means[row], log_stds[row], strict=True)
        )
        / 2
    )
    assert fixed.info_terms(q_out, latent)[1].item() == pytest.approx(by_hand_fixed)
    assert learned.info_terms(q_out, latent)[1].item() == pytest.approx(by_hand_learned)
    assert abs(by_hand_learned - by_hand_fixed) > 1.0


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


def test_non_finite_losses_raise_divergence(tiny_cfg: TrainConfig) -> None:
    trainer = InfoGANTrainer(tiny_cfg, torch.device("cpu"))
    stats = torch.tensor([float("nan"), 1.0, 1.0, 0.0, 2.0])
    with pytest.raises(DivergenceError, match="non-finite"):
        trainer.window_metrics(stats, 1)


def test_batchnorm_uses_default_eps(tiny_cfg: TrainConfig) -> None:
    model = InfoGANTrainer(tiny_cfg, torch.device("cpu")).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
