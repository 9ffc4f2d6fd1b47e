"""Which form trains P InfoGANs fastest on this machine: one at a time, grouped layers, or vmap.

    .venv/bin/python benchmarks/pack_forms.py [--packs 1 2 4] [--batch-sizes 64 128] [--rounds 5] [--device cpu]

Each round times one step of every form at every pack size and batch size, interleaved, so that a machine
whose speed swings (shared cores) slows every form alike; prints one JSON line per (form, pack, batch) with the
best and the median of the rounds' images/s, and the same run's float32 matmul rate.

- `one-at-a-time`: P packs of one (`harness.pack.PackTrainer`), stepped in turn: how trials ran before packs.
- `grouped`: one `PackTrainer` of P members: grouped convolutions, BatchNorm over member-blocked channels,
  batched matmuls (`harness.packed_model`). What the harness trains with.
- `vmap`: the members' `harness.model.InfoGAN` modules stacked with `torch.func.stack_module_state` and called
  under `torch.func.vmap` (the same step, the same BatchedAdam): the alternative the issue names.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, stack_module_state, vmap

from harness.batched_adam import BatchedAdam
from harness.bench import IMAGES, matmul_gflop_per_s, synchronize
from harness.config import TrainConfig
from harness.device import resolve_device
from harness.model import InfoGAN
from harness.pack import PackTrainer, binary_cross_entropy
from harness.seeding import initial_model

Tensors = dict[str, torch.Tensor]


class VmapStep:
    """The pack's step with the members' own modules, stacked and vmapped. Shares `PackTrainer`'s batches,
    latents, loss terms and optimiser arithmetic, so only the form of the layers differs."""

    def __init__(self, pack: PackTrainer, models: list[InfoGAN]) -> None:
        self.pack = pack
        params, self.buffers = stack_module_state(models)  # (P, ...) each
        self.params = {name: value.detach().requires_grad_() for name, value in params.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        # The members' learning rates and betas, as the pack's optimisers hold them.
        self.opt = {
            part: BatchedAdam(self.part_params(part), {k: v.clone() for k, v in source.members.items()})
            for part, source in (("d", pack.opt_d), ("g", pack.opt_g), ("q", pack.opt_q))
        }

    def part_params(self, part: str) -> list[torch.Tensor]:
        prefixes = {"d": ("trunk.", "d_head."), "g": ("generator.",), "q": ("q_head.",)}[part]
        return [value for name, value in self.params.items() if name.startswith(prefixes)]

    def call(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """`module` of every member on its own slice of x (P, B, ...), vmapped over the members."""

        def one(params: Tensors, buffers: Tensors, x: torch.Tensor) -> torch.Tensor:
            part = getattr(self.base, module)
            own = {name.removeprefix(f"{module}."): v for name, v in params.items() if name.startswith(module)}
            kept = {name.removeprefix(f"{module}."): v for name, v in buffers.items() if name.startswith(module)}
            return functional_call(part, (own, kept), (x,))

        return vmap(one)(self.params, self.buffers, x)

    def discriminate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.call("trunk", images)  # (P, B, 1024)
        return self.call("d_head", features).squeeze(-1), self.call("q_head", features)  # (P, B), (P, B, q_dim)

    def step(self) -> None:
        pack = self.pack
        pack.next_batch()
        latent = pack.spec.latent(pack.draws)
        real = pack.images.transpose(0, 1).unsqueeze(2).float().div_(255)  # (P, B, 1, 28, 28)
        fake = self.call("generator", latent.vector)  # (P, B, 1, 28, 28)
        d_real, _ = self.discriminate(real)
        d_fake, q_fake = self.discriminate(fake.detach())
        ce, nll = pack.info_terms(q_fake, latent)
        loss = binary_cross_entropy(d_real, 1.0) + binary_cross_entropy(d_fake, 0.0) + pack.info_loss(ce, nll)
        self.update(loss.sum(), ("d", "q"))
        d_fake, q_fake = self.discriminate(fake)
        ce, nll = pack.info_terms(q_fake, latent)
        self.update((binary_cross_entropy(d_fake, 1.0) + pack.info_loss(ce, nll)).sum(), ("g",))

    def update(self, loss: torch.Tensor, parts: tuple[str, ...]) -> None:
        params = [p for part in parts for p in self.part_params(part)]
        grads = iter(torch.autograd.grad(loss, params))
        for part in parts:
            self.opt[part].step([next(grads) for _ in self.part_params(part)])


def forms(members: int, batch_size: int, device: torch.device) -> dict[str, Callable[[], object]]:
    configs = [
        TrainConfig.model_validate({"optim": {"batch_size": batch_size}, "device": str(device), "seed": seed})
        for seed in range(members)
    ]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 28, 28), dtype=torch.uint8, generator=generator).to(device)
    singles = [PackTrainer([cfg], [initial_model(cfg, device)], images, device) for cfg in configs]
    grouped = PackTrainer(configs, [initial_model(cfg, device) for cfg in configs], images, device)
    models = [initial_model(cfg, device) for cfg in configs]
    vmapped = VmapStep(PackTrainer(configs, models, images, device, cuda_graph=False), models)

    def one_at_a_time() -> object:
        return [single.step() for single in singles]

    return {"one-at-a-time": one_at_a_time, "grouped": grouped.step, "vmap": vmapped.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each form, interleaved")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cases = {(p, b): forms(p, b, device) for p in args.packs for b in args.batch_sizes}
    for work in (w for case in cases.values() for w in case.values()):
        work()  # warm-up: first-call allocations
        work()
    seconds: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(args.rounds):
        for (members, batch), case in cases.items():
            for form, work in case.items():
                synchronize(device)
                start = time.perf_counter()
                work()
                synchronize(device)
                seconds.setdefault((form, members, batch), []).append(time.perf_counter() - start)
    matmul = matmul_gflop_per_s(device)
    for (form, members, batch), times in seconds.items():
        row = {
            "form": form,
            "pack": members,
            "batch_size": batch,
            "images_per_s_best": round(members * batch / min(times), 1),
            "images_per_s_median": round(members * batch / statistics.median(times), 1),
            "rounds": len(times),
            "matmul_gflop_per_s": round(matmul, 1),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
