"""The trainer config: defaults, YAML, overrides and every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.config import TrainConfig, flatten, load_train_config
from harness.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_mnist_setting() -> None:
    cfg = load_train_config()
    assert cfg.codes.categorical == (10,) and cfg.codes.continuous == 2 and cfg.codes.noise == 62
    assert (cfg.optim.lr_d, cfg.optim.lr_g, cfg.optim.beta1, cfg.optim.batch_size) == (2e-4, 1e-3, 0.5, 128)
    assert cfg.loss.lambda_cat == 1.0 and cfg.loss.lambda_con < 1.0
    assert cfg.steps == 5000


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr_d: 2e-4\n  lr_g: 5e-4\ncodes:\n  categorical: [10, 4]\nseed: 3\n")
    cfg = load_train_config(path, ("optim.lr_g=1e-3", "loss.continuous_std=fixed"))
    assert cfg.optim.lr_d == pytest.approx(2e-4)  # `2e-4` is read as a float, not a string
    assert cfg.optim.lr_g == pytest.approx(1e-3)  # the override wins
    assert cfg.codes.categorical == (10, 4)
    assert cfg.loss.continuous_std == "fixed" and cfg.seed == 3


def test_train_section_of_a_study_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: s\ntrials: 2\ntrain:\n  steps: 7\nsearch: {}\n")
    assert load_train_config(path).steps == 7


def test_config_is_frozen() -> None:
    cfg = load_train_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.steps = 3  # type: ignore[misc]


def test_flatten_gives_every_dotted_key() -> None:
    flat = flatten(TrainConfig().model_dump())
    assert flat["optim.lr_d"] == 2e-4 and flat["codes.categorical"] == (10,) and "data.root" in flat


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("optim:\n  lr_x: 1\n", "optim.lr_x", "unknown key"),
        ("colour: red\n", "colour", "unknown key"),
        ("steps: 0\n", "steps", "greater than 0"),
        ("steps: ten\n", "steps", "valid integer"),
        ("steps: 1.5\n", "steps", "valid integer"),
        ("data:\n  download: maybe\n", "data.download", "valid boolean"),
        ("optim:\n  lr_d: -1.0e-3\n", "optim.lr_d", "greater than 0"),
        ("optim:\n  beta1: 1.0\n", "optim.beta1", "less than 1"),
        ("codes:\n  categorical: [10, 1]\n", "codes.categorical", "at least 2 categories"),
        ("codes:\n  continuous: -1\n", "codes.continuous", "greater than or equal to 0"),
        ("device: gpu\n", "device", "cuda"),
        ("data:\n  dataset: cifar10\n", "data.dataset", "'mnist'"),
    ],
)
def test_bad_values_name_file_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_train_config(path)
    assert caught.value.source == str(path) and caught.value.key == key
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "empty"), ("steps: [1,\n", "invalid YAML: line"), ("- 1\n- 2\n", "expected a mapping")],
)
def test_broken_files(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_train_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr_d", "expected KEY=VALUE"),
        ("optim.nope=1", "optim.nope: unknown key"),
        ("optim=1", "optim: is a section"),
        ("steps=-5", "steps: Input should be greater than 0"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_train_config(None, (override,))
    assert caught.value.source == "--set"


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr_d: -1.0\n")
    store = tmp_path / "mlruns"
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "train", str(path), "--tracking-uri", f"sqlite:///{store}/mlflow.db"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: optim.lr_d: Input should be greater than 0"
    assert "Traceback" not in result.stderr + result.stdout
    assert not store.exists()
