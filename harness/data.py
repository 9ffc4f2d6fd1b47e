"""MNIST and Fashion-MNIST as uint8 tensors on the training device, with a bundled real-MNIST fallback."""

from __future__ import annotations

import gzip
import struct
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from harness.config import DataConfig

# torchvision's folder name per dataset: <root>/<folder>/raw/
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataUnavailableError(RuntimeError):
    """The dataset is neither on disk, downloadable, nor bundled."""


@dataclass(frozen=True)
class Dataset:
    train_images: torch.Tensor  # (N, 28, 28) uint8; labels are never loaded for training
    test_images: torch.Tensor  # (M, 28, 28) uint8, evaluation only
    test_labels: torch.Tensor  # (M,) int64
    source: str  # torchvision | debian | bundled-10k
    location: str  # the folder the files were read from

    def to(self, device: torch.device) -> Dataset:
        return Dataset(
            self.train_images.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.source,
            self.location,
        )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_split_folder(folder: Path, source: str) -> Dataset | None:
    """All four IDX files of a folder, or None when any is missing."""
    found = {name: find_idx(folder, stem) for name, stem in SPLIT_FILES.items()}
    paths = {name: path for name, path in found.items() if path is not None}
    if len(paths) < len(SPLIT_FILES):
        return None
    arrays = {name: torch.from_numpy(read_idx(path).copy()) for name, path in paths.items()}
    return Dataset(
        train_images=arrays["train_images"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].long(),
        source=source,
        location=str(folder),
    )


def download(cfg: DataConfig) -> None:
    """Fetch the dataset into `<root>/<folder>/raw` with torchvision; warns when offline."""
    from torchvision import datasets

    cls = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
    try:
        for train in (True, False):
            cls(cfg.root, train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        warnings.warn(f"could not download {cfg.dataset}: {' '.join(str(err).split())}", stacklevel=2)


def bundled_mnist_folder() -> Path:
    return Path(str(resources.files("harness") / "bundled" / "mnist-10k"))


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load from `cfg.root`, downloading if asked; else fall back (with a warning) to what ships."""
    raw = Path(cfg.root) / TORCHVISION_FOLDER[cfg.dataset] / "raw"
    found = read_split_folder(raw, "torchvision")
    if found is None and cfg.download:
        download(cfg)
        found = read_split_folder(raw, "torchvision")
    if found is not None:
        return found
    if cfg.dataset == "fashion-mnist":
        found = read_split_folder(DEBIAN_FASHION_MNIST, "debian")
        if found is None:
            raise DataUnavailableError(
                f"Fashion-MNIST is not in {raw} nor {DEBIAN_FASHION_MNIST} "
                "(apt-get install dataset-fashion-mnist, or set data.download: true when online)"
            )
    else:
        found = read_split_folder(bundled_mnist_folder(), "bundled-10k")
        assert found is not None, "the bundled MNIST subset is missing from the package"
    warnings.warn(
        f"{cfg.dataset} not found in {raw}: using {found.source} data from {found.location} "
        f"({len(found.train_images)} train / {len(found.test_images)} test images)",
        stacklevel=2,
    )
    return found
