"""The shipped digit classifier: its file, its stated accuracy, its features, and the script that made it."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.classifier import FEATURE_DIM, LeNet, classifier_weights_path, load_classifier
from harness.data import Dataset, bundled_mnist_folder, read_split_folder
from harness.evaluate import as_float_images
from harness.metrics import frechet_distance

README = classifier_weights_path().parent / "README.md"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_classifier.py"


def readme_value(pattern: str) -> str:
    found = re.search(pattern, README.read_text())
    assert found is not None, f"{README} states no {pattern!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def bundled() -> Dataset:
    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    return data


@pytest.fixture(scope="module")
def classifier() -> LeNet:
    return load_classifier("cpu")


def test_the_readme_states_the_files_sha256() -> None:
    digest = hashlib.sha256(classifier_weights_path().read_bytes()).hexdigest()
    assert readme_value(r"SHA256: `([0-9a-f]{64})`") == digest


def test_the_weights_are_a_plain_state_dict_loaded_frozen_in_eval_mode(classifier: LeNet) -> None:
    state = torch.load(classifier_weights_path(), weights_only=True)  # tensors only: no pickled code runs
    assert set(state) == set(LeNet().state_dict())
    assert all(torch.equal(state[name], value) for name, value in classifier.state_dict().items())
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())


def test_the_held_out_accuracy_is_the_one_the_readme_states(classifier: LeNet, bundled: Dataset) -> None:
    with torch.no_grad():
        predicted = classifier(as_float_images(bundled.test_images)).argmax(dim=1)
    accuracy = (predicted == bundled.test_labels).float().mean().item()
    assert accuracy == pytest.approx(float(readme_value(r"Held-out accuracy: (0\.\d+)")), abs=0.005)


def test_features_are_the_penultimate_layer_that_the_logits_come_from(classifier: LeNet, bundled: Dataset) -> None:
    images = as_float_images(bundled.test_images[:5])
    with torch.no_grad():
        features, logits = classifier.features(images)
        assert features.shape == (5, FEATURE_DIM) and logits.shape == (5, 10)
        assert torch.equal(logits, classifier(images))
        assert torch.equal(logits, classifier.head(features))


def test_real_digits_are_near_each_other_and_far_from_noise(classifier: LeNet, bundled: Dataset) -> None:
    images = as_float_images(bundled.test_images)  # (1996, 1, 28, 28)
    noise = torch.rand(len(images) // 2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = classifier.features(images)[0].numpy()
        fake = classifier.features(noise)[0].numpy()
    real_vs_real = frechet_distance(real[0::2], real[1::2])  # two halves of the held-out digits
    real_vs_noise = frechet_distance(real[0::2], fake)
    assert real_vs_noise > 100 * real_vs_real  # two orders of magnitude apart


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed unsigned-byte IDX file."""
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def train_one_epoch(data_root: Path, out: Path) -> tuple[str, float]:
    """The script's log and the held-out accuracy it printed."""
    command = [sys.executable, str(SCRIPT), "--data-root", str(data_root), "--epochs", "1", "--out", str(out)]
    log = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    found = re.search(r"held-out accuracy: ([\d.]+)", log)
    assert found is not None, log
    return log, float(found.group(1))


@pytest.mark.slow
def test_the_script_gives_the_same_weights_whatever_the_test_split_holds(tmp_path: Path) -> None:
    honest, shuffled = tmp_path / "honest" / "MNIST" / "raw", tmp_path / "shuffled" / "MNIST" / "raw"
    for raw in (honest, shuffled):
        raw.mkdir(parents=True)
        for path in bundled_mnist_folder().glob("*.gz"):
            shutil.copy(path, raw / path.name)
    # the second root's test labels are shuffled: if training read them, its weights would differ
    with gzip.open(shuffled / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    (shuffled / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(shuffled / "t10k-labels-idx1-ubyte", np.random.default_rng(0).permutation(labels))

    log_honest, accuracy_honest = train_one_epoch(honest.parents[1], tmp_path / "a" / "lenet.pt")
    log_shuffled, accuracy_shuffled = train_one_epoch(shuffled.parents[1], tmp_path / "b" / "lenet.pt")
    assert f"data: torchvision ({honest})" in log_honest and f"data: torchvision ({shuffled})" in log_shuffled
    assert accuracy_honest > 0.5 > accuracy_shuffled  # each run read and scored its own test split
    assert (tmp_path / "a" / "lenet.pt").read_bytes() == (tmp_path / "b" / "lenet.pt").read_bytes()
