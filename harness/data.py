"""MNIST and Fashion-MNIST as uint8 tensors on the training device, with a bundled real-MNIST fallback."""

from __future__ import annotations

import gzip
import socket
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
DOWNLOAD_TIMEOUT_S = 30  # a network that hangs rather than refuses costs this, once
SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataFallbackWarning(UserWarning):
    """The dataset is not where the config says, or cannot be downloaded: runs use the fallback that ships."""


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
    """Fetch the dataset into `<root>/<folder>/raw` with torchvision, giving a silent network DOWNLOAD_TIMEOUT_S
    a try; warns in one line when offline."""
    from torchvision import datasets

    cls = datasets.MNIST if cfg.dataset == "mnist" else datasets.FashionMNIST
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for train in (True, False):
            cls(cfg.root, train=train, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        reason = " ".join(str(err).split())[:120]
        warnings.warn(f"could not download {cfg.dataset}: {reason}", DataFallbackWarning, stacklevel=2)
    finally:
        socket.setdefaulttimeout(previous)


def bundled_mnist_folder() -> Path:
    return Path(str(resources.files("harness") / "bundled" / "mnist-10k"))


def raw_folder(cfg: DataConfig) -> Path:
    return Path(cfg.root) / TORCHVISION_FOLDER[cfg.dataset] / "raw"


def has_split(folder: Path) -> bool:
    """Whether a folder holds all four IDX files."""
    return all(find_idx(folder, stem) is not None for stem in SPLIT_FILES.values())


def locate(cfg: DataConfig) -> tuple[Path, str]:
    """Where the data is read from, and its source: torchvision's layout under `cfg.root`, else the bundled
    real-MNIST subset (MNIST) or Debian's package (Fashion-MNIST)."""
    if has_split(raw_folder(cfg)):
        return raw_folder(cfg), "torchvision"
    if cfg.dataset == "mnist":
        return bundled_mnist_folder(), "bundled-10k"
    if has_split(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST, "debian"
    raise DataUnavailableError(
        f"Fashion-MNIST is not in {raw_folder(cfg)} nor {DEBIAN_FASHION_MNIST} "
        "(apt-get install dataset-fashion-mnist, or set data.download: true when online)"
    )


def settle(cfg: DataConfig) -> DataConfig:
    """Decide once which data many runs use (a sweep's trials): download now if asked and missing, then the
    config for the runs, which do not ask the network again."""
    if cfg.download and not has_split(raw_folder(cfg)):
        download(cfg)
    return cfg.model_copy(update={"download": False})


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load from `cfg.root`, downloading if asked; else fall back (with a warning) to what ships."""
    if cfg.download and not has_split(raw_folder(cfg)):
        download(cfg)
    folder, source = locate(cfg)
    found = read_split_folder(folder, source)
    assert found is not None, f"{folder} holds the four IDX files"
    if source != "torchvision":
        warnings.warn(fallback_note(cfg, found), DataFallbackWarning, stacklevel=2)
    return found


def fallback_note(cfg: DataConfig, data: Dataset) -> str:
    return (
        f"{cfg.dataset} not found in {raw_folder(cfg)}: using {data.source} data from {data.location} "
        f"({len(data.train_images)} train / {len(data.test_images)} test images)"
    )
