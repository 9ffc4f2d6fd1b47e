"""Does the CUDA-graph step train as the eager step does? Three packs from the same state, stepped in lockstep.

    .venv/bin/python benchmarks/graph_check.py [--pack 4] [--steps 12] [--batch-size 128] [--device auto]
        [--out FILE]

`graph` replays the captured step (after `harness.pack.WARMUP_STEPS` eager steps); `eager` and `eager2` step
eagerly. All three start from the same members (seeds 0..P-1) and draw the same batches and latents, so each
step's stats (loss/d, loss/g, loss/info, nll, CE per member) may differ only by rounding: `eager2` against
`eager` is that floor (cuDNN and cuBLAS may pick non-deterministic kernels). A graph that replays stale
weights, a missed optimiser update or an alternating D/G backward captured wrongly shows up as a difference
far above the floor, from the first replayed step on. Prints (and writes to --out) one JSON line: the max
relative difference of the stats per step, graph vs eager and eager2 vs eager, the same for the parameters
after the last step, and a verdict. On a CPU there is no graph: the check runs, eager against eager.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness.bench import IMAGES, synchronize
from harness.config import TrainConfig
from harness.device import resolve_device
from harness.pack import WARMUP_STEPS, PackTrainer
from harness.seeding import initial_model

TINY = 1e-6  # relative differences are taken against at least this
ALLOWED = 1e-2  # a graph step within this of eager (or within 10x the eager floor) passes


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Stats (P, n): max over elements of |a - b| over the largest |b| of that stat across members (a stat
    near 0, such as the continuous codes' NLL, would make an element's own relative difference meaningless);
    NaN or inf anywhere: inf."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float(((a - b).abs() / b.abs().amax(dim=0, keepdim=True).clamp(min=TINY)).max())


def parameters_relative(a: PackTrainer, b: PackTrainer) -> float:
    """Max relative difference over every parameter, scaled by each tensor's largest magnitude."""
    worst = 0.0
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        scale = float(pb.detach().abs().max().clamp(min=TINY))
        worst = max(worst, float((pa.detach() - pb.detach()).abs().max()) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help=f"steps of each pack (the first {WARMUP_STEPS} eager)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    configs = [
        TrainConfig.model_validate({"optim": {"batch_size": args.batch_size}, "device": args.device, "seed": seed})
        for seed in range(args.pack)
    ]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 28, 28), dtype=torch.uint8, generator=generator).to(device)

    def pack(cuda_graph: bool) -> PackTrainer:
        return PackTrainer(configs, [initial_model(cfg, device) for cfg in configs], images, device, cuda_graph)

    graph, eager, eager2 = pack(True), pack(False), pack(False)
    graph_vs_eager, floor = [], []
    for _ in range(args.steps):
        s_graph, s_eager, s_eager2 = graph.step(), eager.step(), eager2.step()
        synchronize(device)
        graph_vs_eager.append(relative(s_graph, s_eager))
        floor.append(relative(s_eager2, s_eager))
    replayed = graph_vs_eager[WARMUP_STEPS:]
    worst, worst_floor = max(replayed, default=0.0), max(floor[WARMUP_STEPS:], default=0.0)
    row = {
        "device": str(device),
        "pack": args.pack,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cuda_graph": graph.graph is not None,
        "eager_steps_before_capture": WARMUP_STEPS,
        "stats_rel_diff_graph_vs_eager": [float(f"{d:.3g}") for d in graph_vs_eager],
        "stats_rel_diff_eager_vs_eager": [float(f"{d:.3g}") for d in floor],
        "params_rel_diff_graph_vs_eager": float(f"{parameters_relative(graph, eager):.3g}"),
        "params_rel_diff_eager_vs_eager": float(f"{parameters_relative(eager2, eager):.3g}"),
        "ok": worst <= max(ALLOWED, 10 * worst_floor),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")
    if not row["ok"]:
        raise SystemExit(f"graph step differs from the eager step by {worst:.3g} (eager floor {worst_floor:.3g})")


if __name__ == "__main__":
    main()
