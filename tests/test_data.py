"""Data: the IDX reader, torchvision's layout, and the bundled fallback."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.config import DataConfig
from harness.data import bundled_mnist_folder, load_dataset, read_idx


def test_bundled_files_match_their_checksums() -> None:
    folder = bundled_mnist_folder()
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_fallback_to_the_bundled_subset_warns_and_says_so(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="bundled-10k"):
        data = load_dataset(DataConfig(root=str(tmp_path), download=False))
    assert data.source == "bundled-10k"
    assert tuple(data.train_images.shape) == (8004, 28, 28) and data.train_images.dtype.is_floating_point is False
    assert tuple(data.test_images.shape) == (1996, 28, 28)
    assert sorted(data.test_labels.unique().tolist()) == list(range(10))


def test_reads_torchvision_layout_plain_and_gzipped(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in bundled_mnist_folder().glob("*.gz"):
        if path.name.startswith("train"):  # gunzipped, as torchvision leaves them
            with gzip.open(path) as src, open(raw / path.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(path, raw / path.name)
    data = load_dataset(DataConfig(root=str(tmp_path), download=False))
    assert data.source == "torchvision" and data.location == str(raw)
    assert len(data.train_images) == 8004 and len(data.test_labels) == 1996


def test_read_idx_shapes_and_values(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + array.tobytes())
    assert np.array_equal(read_idx(path), array)


@pytest.mark.may_skip
def test_fashion_mnist_missing_everywhere_is_a_clear_error(tmp_path: Path) -> None:
    from harness import data as data_module

    if data_module.DEBIAN_FASHION_MNIST.exists():
        pytest.skip("Debian's Fashion-MNIST is installed here, so it is not missing")
    with pytest.raises(data_module.DataUnavailableError, match="dataset-fashion-mnist"):
        load_dataset(DataConfig(dataset="fashion-mnist", root=str(tmp_path), download=False))
