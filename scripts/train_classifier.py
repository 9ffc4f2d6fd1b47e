"""Train the LeNet of harness/classifier.py, which scores generated digits, on the training split's labels.

    .venv/bin/python scripts/train_classifier.py --epochs 15 --seed 0 --out harness/bundled/classifier/lenet.pt

Data: torchvision's MNIST layout under --data-root (`<root>/MNIST/raw/*-ubyte[.gz]`) when all four IDX
files are there, else the bundled 8,004/1,996-digit subset. It trains on the training split only; the
test split is read once, after training, to print the held-out accuracy (nothing is selected on it).
Each training image gets a random rotation (±10°), scale (0.9-1.1) and shift (±2 px), so the classifier
also reads the slanted, thick or off-centre digits a generator draws. One CPU thread and one seed make
the same command give the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.classifier import LeNet, classifier_weights_path
from harness.data import SPLIT_FILES, Dataset, bundled_mnist_folder, find_idx, read_idx, read_split_folder
from harness.evaluate import as_float_images

BATCH_SIZE = 64
LEARNING_RATE = 2e-3  # Adam, cosine-annealed to 0 over the run
MAX_ROTATION_DEG = 10.0
MAX_SCALE_CHANGE = 0.1
MAX_SHIFT_PX = 2.0


def load_data(root: Path) -> tuple[Dataset, torch.Tensor]:
    """The four IDX files of `<root>/MNIST/raw`, else the bundled subset; and the training labels (N,) int64."""
    data = read_split_folder(root / "MNIST" / "raw", "torchvision") or read_split_folder(
        bundled_mnist_folder(), "bundled-10k"
    )
    assert data is not None, "the bundled MNIST subset is missing from the package"
    labels_path = find_idx(Path(data.location), SPLIT_FILES["train_labels"])
    assert labels_path is not None
    return data, torch.from_numpy(read_idx(labels_path).astype(np.int64))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random rotation, scale and shift of each image (B, 1, 28, 28); uncovered pixels are background (0)."""
    draws = torch.rand(len(images), 4, generator=generator) * 2 - 1  # (B, 4) in [-1, 1]: angle, zoom, shift x, y
    angle = draws[:, 0] * math.radians(MAX_ROTATION_DEG)
    zoom = 1 + draws[:, 1] * MAX_SCALE_CHANGE
    shift = draws[:, 2:4] * MAX_SHIFT_PX * 2 / 28  # pixels -> affine_grid's [-1, 1] coordinates
    # theta maps each output pixel to the input point it samples: the inverse of rotating and zooming
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, sin, -shift[:, 0]], 1), torch.stack([-sin, cos, -shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, 28, 28, 2)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> LeNet:
    """Adam on the cross-entropy of augmented training images (N, 28, 28) uint8 with labels (N,)."""
    torch.manual_seed(seed)  # the initial weights
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * math.ceil(len(images) / BATCH_SIZE))
    inputs = as_float_images(images)  # (N, 1, 28, 28) in [0, 1], the scale D sees
    for epoch in range(epochs):
        loss_sum, correct = 0.0, 0
        for batch in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            logits = model(augment(inputs[batch], generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(1) == labels[batch]).sum())
        print(
            f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / len(images):.4f}, "
            f"train accuracy (augmented) {correct / len(images):.4f}",
            flush=True,
        )
    return model.eval()


@torch.no_grad()
def count_correct(model: LeNet, images: torch.Tensor, labels: torch.Tensor) -> int:
    return int((model(as_float_images(images)).argmax(1) == labels).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision-style MNIST root")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=classifier_weights_path(), help="where the state dict goes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible sums, and polite on a shared CPU
    torch.use_deterministic_algorithms(True)

    data, train_labels = load_data(args.data_root)
    print(
        f"data: {data.source} ({data.location}), {len(data.train_images)} training images; "
        f"{len(data.test_images)} held out",
        flush=True,
    )
    model = train(data.train_images, train_labels, args.epochs, args.seed)
    correct = count_correct(model, data.test_images, data.test_labels)
    print(f"held-out accuracy: {correct / len(data.test_labels):.4f} ({correct}/{len(data.test_labels)})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
