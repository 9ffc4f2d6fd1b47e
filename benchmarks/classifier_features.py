"""What the sample-quality metrics cost at one evaluation: classifier features, generation, FLD, purity.

    .venv/bin/python benchmarks/classifier_features.py [--generated 1000] [--repeats 5] [--threads N]

Times (median of --repeats, after one warm-up) the shipped LeNet's features of the bundled subset's
1,996 held-out digits and of --generated images from an untrained InfoGAN generator (the default
config's latent layout; the images' content does not change the cost), the generation itself,
`frechet_distance` on the two feature sets and `generated_purity` on the predicted digits. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from harness.classifier import load_classifier
from harness.config import TrainConfig
from harness.data import bundled_mnist_folder, read_split_folder
from harness.evaluate import EVAL_CHUNK, as_float_images
from harness.latent import LatentSpec
from harness.metrics import frechet_distance, generated_purity
from harness.model import InfoGAN


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: first-call allocations
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    classifier = load_classifier("cpu")
    spec = LatentSpec.from_config(TrainConfig().codes)
    generator = InfoGAN(spec.dim, spec.q_dim).generator.eval()
    latent = spec.sample(args.generated, torch.Generator().manual_seed(args.seed), torch.device("cpu"))

    def real_features() -> torch.Tensor:  # (1996, 84), in the trainer's evaluation chunks
        return torch.cat(
            [classifier.features(as_float_images(chunk))[0] for chunk in data.test_images.split(EVAL_CHUNK)]
        )

    def generate() -> torch.Tensor:  # (N, 1, 28, 28) in [0, 1]
        return torch.cat([generator(chunk) for chunk in latent.vector.split(EVAL_CHUNK)])

    images = generate()

    def generated_features() -> tuple[torch.Tensor, torch.Tensor]:  # (N, 84), (N, 10)
        pairs = [classifier.features(chunk) for chunk in images.split(EVAL_CHUNK)]
        return torch.cat([f for f, _ in pairs]), torch.cat([logits for _, logits in pairs])

    real = real_features().numpy()
    fake, logits = generated_features()
    digits, categories = logits.argmax(dim=1).numpy(), latent.categories[:, 0].numpy()
    timings = {
        "real_features_s": median_seconds(real_features, args.repeats),
        "generate_s": median_seconds(generate, args.repeats),
        "generated_features_s": median_seconds(generated_features, args.repeats),
        "frechet_distance_s": median_seconds(lambda: frechet_distance(real, fake.numpy()), args.repeats),
        "generated_purity_s": median_seconds(lambda: generated_purity(categories, digits), args.repeats),
    }
    print(
        json.dumps(
            {
                "real_images": len(real),
                "generated_images": args.generated,
                **{name: round(value, 5) for name, value in timings.items()},
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
