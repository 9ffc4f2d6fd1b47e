"""`harness bench` prints one JSON line with counted FLOPs (no timing is asserted), checked against a count of
this test's own: one plain (unpacked) InfoGAN's D+Q step and G step, as the paper trains it, under torch's
FlopCounterMode."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from harness.cli import main
from harness.config import TrainConfig
from harness.latent import LatentSpec
from harness.seeding import initial_model

BATCH = 4
PAPER_TRIAL_IMAGES = 5000 * 128  # the official MNIST run: 5,000 steps at batch 128


def gflop_per_image() -> float:
    """GFLOPs of one image's D+Q step (D and Q on a real and a fake batch, gradients of D's and Q's weights)
    and G step (D and Q on the fake batch, gradients of G's weights), counted on a model of one member."""
    cfg = TrainConfig()
    model = initial_model(cfg, torch.device("cpu"))
    latent = torch.randn(BATCH, LatentSpec.from_config(cfg.codes).dim)
    d_and_q = [*model.trunk.parameters(), *model.d_head.parameters(), *model.q_head.parameters()]
    with FlopCounterMode(display=False) as counter:
        fake = model.generator(latent)
        d_real, _ = model.discriminate(torch.rand(BATCH, 1, 28, 28))
        d_fake, q_fake = model.discriminate(fake.detach())
        torch.autograd.grad(d_real.sum() + d_fake.sum() + q_fake.sum(), d_and_q)
        d_fake, q_fake = model.discriminate(fake)
        torch.autograd.grad(d_fake.sum() + q_fake.sum(), list(model.generator.parameters()))
    return float(counter.get_total_flops()) / BATCH / 1e9


def test_bench_prints_one_json_line_with_counted_flops() -> None:
    result = CliRunner().invoke(main, ["bench", "--batch-size", str(BATCH), "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["device"] == "cpu" and line["batch_size"] == BATCH
    assert line["images_per_s"] > 0
    counted = gflop_per_image()  # the paper's MNIST nets: about 0.29 GFLOP
    assert line["gflop_per_image"] == pytest.approx(counted, abs=5e-5)  # it rounds to 4 places
    assert line["gflop_per_s"] == pytest.approx(line["images_per_s"] * counted, rel=1e-3, abs=0.1)


def test_bench_rejects_a_bad_device() -> None:
    result = CliRunner().invoke(main, ["bench", "--device", "gpu"])
    assert result.exit_code == 2 and "device" in result.output


def test_bench_of_a_pack_counts_all_members_and_each() -> None:
    args = ["bench", "--batch-size", str(BATCH), "--steps", "5", "--device", "cpu", "--pack", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["pack"] == 2 and line["cuda_graph"] is False
    assert line["gflop_per_image"] == pytest.approx(gflop_per_image(), abs=5e-5)  # each member's image costs the same
    assert line["images_per_s_per_member"] == pytest.approx(line["images_per_s"] / 2, abs=0.1)
    assert line["matmul_gflop_per_s"] > 0
    assert line["matmul_share"] == pytest.approx(line["gflop_per_s"] / line["matmul_gflop_per_s"], abs=2e-3)
    assert line["paper_trials_per_hour"] == pytest.approx(line["images_per_s"] * 3600 / PAPER_TRIAL_IMAGES, abs=0.01)
