"""`harness bench` prints one JSON line with counted FLOPs (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main


def test_bench_prints_one_json_line_with_counted_flops() -> None:
    result = CliRunner().invoke(main, ["bench", "--batch-size", "4", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["device"] == "cpu" and line["batch_size"] == 4
    assert line["images_per_s"] > 0
    # The paper's MNIST nets: about 0.29 GFLOP per image for a D+Q step and a G step.
    assert 0.2 < line["gflop_per_image"] < 0.4
    assert line["gflop_per_s"] > 0


def test_bench_rejects_a_bad_device() -> None:
    result = CliRunner().invoke(main, ["bench", "--device", "gpu"])
    assert result.exit_code == 2 and "device" in result.output


def test_bench_of_a_pack_counts_all_members_and_each() -> None:
    result = CliRunner().invoke(main, ["bench", "--batch-size", "4", "--steps", "5", "--device", "cpu", "--pack", "2"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["pack"] == 2 and line["cuda_graph"] is False
    assert line["images_per_s_per_member"] == pytest.approx(line["images_per_s"] / 2, abs=0.1)
    assert line["matmul_gflop_per_s"] > 0
    assert line["matmul_share"] == pytest.approx(line["gflop_per_s"] / line["matmul_gflop_per_s"], abs=2e-3)
    assert line["paper_trials_per_hour"] == pytest.approx(line["images_per_s"] * 3600 / (5000 * 128), abs=0.01)
