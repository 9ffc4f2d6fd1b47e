"""A pack's members against the unpacked trainer (tests/reference.py), and against each other.

What is compared, and how closely:
- initial weights, batches and latents: exactly (bit for bit), as each member draws them from its own seed;
- a member's step stats (loss/d, loss/g, loss/info, nll, ce) at step 1: within STEP1_RTOL. Step 1's forward
  passes (and D's first update, which loss/g already sees) differ only by summation order: grouped layers and
  BatchNorm over P·C channels reduce in another order than the unpacked modules (measured ≤ 2e-5 relative);
  a D learning rate 10 % off moves them by 1e-2, a λ 10 % off by 9e-2 (test_the_tolerance_tells_a_changed_setting);
- the first FOLLOW_STEPS steps: within FOLLOW_RTOL. From step 2 on, rounding is amplified, not averaged: Adam
  normalises each gradient element by its own magnitude, so near-zero elements take ±lr steps on rounding
  noise, and a pre-activation within rounding of 0 switches a leaky ReLU's slope. The unpacked trainer against
  itself, only its thread count changed (another summation order), already differs by 1e-3 at step 2 and by
  up to 2e-2 within 40 steps; pack members against it: ≤ 2e-2 by step 10 (measured on the 2-core CPU);
- in float64 (test_in_float64_...), three members differing in every per-member setting, 10 steps at batch 8:
  every step's stats within F64_RTOL = 1e-9 elementwise (measured ≤ 8.6e-12; at batch 32 ≤ 4.9e-13), the final
  weights and BatchNorm statistics within 1e-9 in norm (measured ≤ 1.2e-10), Adam's moments within 1e-8 in norm
  (measured ≤ 6.6e-10), its step counts exactly. Rounding is no longer amplified past the tolerance, so a wrong
  learning rate, beta, λ, latent or batch (the planted bugs: ≥ 1.5e-4 from step 2) fails by five orders;
- members against each other: exactly. A member's arithmetic never reads another's values, so changing one
  member (even into NaNs) leaves the others' stats and weights bit for bit the same; changing any one per-member
  setting of member 1 changes its trajectory and leaves members 0 and 2 bit for bit (test_a_setting_changes_...).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.batched_adam import BatchedAdam
from harness.config import TrainConfig
from harness.data import bundled_mnist_folder, read_split_folder
from harness.model import InfoGAN, SNConv2d
from harness.pack import DivergenceError, PackTrainer
from harness.packed_model import PackedInfoGAN, PackedLinear, member_state, pack_states
from harness.seeding import initial_model
from tests.conftest import tiny_config
from tests.reference import ReferenceTrainer

CPU = torch.device("cpu")
STEP1_RTOL = 1e-4
FOLLOW_RTOL, FOLLOW_STEPS = 0.1, 10
PARTS = ("generator", "trunk", "d_head", "q_head")
VARIED = (  # members that differ in everything a member may
    ("seed=3",),
    ("seed=4", "loss.lambda_cat=0.5", "loss.lambda_con=1.0", "loss.continuous_std=fixed", "optim.beta1=0.7"),
    ("seed=5", "optim.q_optimizer=g", "optim.lr_d=3e-4", "optim.lr_g=5e-4", "optim.beta2=0.99"),
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """The bundled training digits (8,004, 28, 28) uint8."""
    data = read_split_folder(bundled_mnist_folder(), "bundled-10k")
    assert data is not None
    return data.train_images


def make_pack(configs: list[TrainConfig], images: torch.Tensor) -> PackTrainer:
    return PackTrainer(configs, [initial_model(cfg, CPU) for cfg in configs], images, CPU)


def varied(tmp_path: Path) -> list[TrainConfig]:
    return [tiny_config(tmp_path, *overrides) for overrides in VARIED]


def parameters(pack: PackTrainer, member: int) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of a member's parameters (not BatchNorm's statistics, which every forward moves), by module."""
    names = {name for name, _ in pack.model.named_parameters()}
    state = pack.member_state(member)
    return {part: {k: v.clone() for k, v in state.items() if k in names and k.startswith(part)} for part in PARTS}


def moved(before: dict[str, dict[str, torch.Tensor]], after: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    return {part for part in PARTS if any(not torch.equal(before[part][k], after[part][k]) for k in before[part])}


def update(
    before: dict[str, dict[str, torch.Tensor]], after: dict[str, dict[str, torch.Tensor]], part: str
) -> torch.Tensor:
    return torch.cat([(after[part][k] - before[part][k]).flatten() for k in before[part]])


def test_batched_adam_is_torch_adam_per_member() -> None:
    """Each member's block follows torch.optim.Adam with its own lr and betas; a member left out stays put."""
    rng = torch.Generator().manual_seed(0)
    lr, beta1, beta2 = [1e-3, 2e-4, 5e-2], [0.5, 0.9, 0.0], [0.999, 0.99, 0.9]
    start = torch.randn(3 * 5, 4, generator=rng)  # 3 members' (5, 4) blocks
    alone = [block.clone().requires_grad_() for block in start.split(5)]
    adams = [torch.optim.Adam([p], lr=a, betas=(b1, b2)) for p, a, b1, b2 in zip(alone, lr, beta1, beta2, strict=True)]
    packed = start.clone()
    batched = BatchedAdam.create([packed], lr, beta1, beta2)
    for _ in range(50):
        grad = torch.randn(3 * 5, 4, generator=rng)
        for p, g, adam in zip(alone, grad.split(5), adams, strict=True):
            p.grad = g.clone()
            adam.step()
        batched.step([grad])
    for p, block, a in zip(alone, packed.split(5), lr, strict=True):
        assert (block - start[: len(block)]).abs().max() > 0  # it moved
        torch.testing.assert_close(block, p.detach(), rtol=0, atol=a * 2e-3)  # within rounding of 50 steps
    kept = [packed.clone(), batched.exp_avg[0].clone(), batched.exp_avg_sq[0].clone()]
    batched.step([torch.randn(3 * 5, 4, generator=rng)], active=torch.tensor([1.0, 0.0, 1.0]))
    now = [packed, batched.exp_avg[0], batched.exp_avg_sq[0]]
    assert all(torch.equal(a[5:10], b[5:10]) for a, b in zip(kept, now, strict=True))  # member 1 sat out
    assert not torch.equal(kept[0][:5], packed[:5])
    assert batched.members["steps"].view(-1).tolist() == [51.0, 50.0, 51.0]


def test_the_packed_model_is_its_members_models() -> None:
    """Same outputs as each member's own InfoGAN (summation order aside), and its state is theirs exactly."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(InfoGAN(74, 14))
    packed = PackedInfoGAN.from_states([m.state_dict() for m in models], 74, 14, CPU)
    state = packed.state_dict()
    assert state.keys() == models[0].state_dict().keys()
    for p, model in enumerate(models):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in member_state(state, 3, p).items())
    kept = packed.select([2, 0]).state_dict()
    assert all(
        torch.equal(kept[k], v) for k, v in pack_states([models[2].state_dict(), models[0].state_dict()]).items()
    )
    rng = torch.Generator().manual_seed(0)
    latent = torch.rand(3, 16, 74, generator=rng)  # (P, B, dim)
    images = torch.rand(16, 3, 28, 28, generator=rng)  # (B, P, 28, 28)
    fake = packed.generator(latent)
    d, q = packed.discriminate(images)
    for p, model in enumerate(models):
        torch.testing.assert_close(fake[:, p], model.generator(latent[p])[:, 0], rtol=1e-5, atol=1e-6)
        d_alone, q_alone = model.discriminate(images[:, p : p + 1])
        torch.testing.assert_close(d[p], d_alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q[p], q_alone, rtol=1e-5, atol=1e-6)
    running = member_state(packed.state_dict(), 3, 1)["trunk.layers.3.running_mean"]  # BatchNorm's, per member
    torch.testing.assert_close(running, models[1].state_dict()["trunk.layers.3.running_mean"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("codes", [(), ("codes.categorical=[10, 3]", "codes.continuous=0")])
def test_a_members_batches_and_latents_are_its_unpacked_runs(
    tmp_path: Path, images: torch.Tensor, codes: tuple[str, ...]
) -> None:
    configs = [tiny_config(tmp_path, f"seed={seed}", *codes) for seed in (3, 4)]
    pack = make_pack(configs, images)
    references = [ReferenceTrainer(cfg, images, CPU) for cfg in configs]
    for _ in range(len(images) // 32 + 10):  # past the end of an epoch
        pack.next_batch()
        latent = pack.spec.latent(pack.draws)  # (P, B, ...)
        for m, reference in enumerate(references):
            assert torch.equal(pack.images[:, m], reference.next_batch())
            assert all(torch.equal(a[m], b) for a, b in zip(latent, reference.sample(), strict=True))


@pytest.mark.slow
def test_a_member_follows_its_unpacked_run(tmp_path: Path, images: torch.Tensor) -> None:
    configs = varied(tmp_path)
    pack = make_pack(configs, images)
    references = [ReferenceTrainer(cfg, images, CPU) for cfg in configs]
    for m, reference in enumerate(references):
        state = pack.member_state(m)
        assert all(torch.equal(state[k], v) for k, v in reference.model.state_dict().items())  # initial weights
    packed = torch.stack([pack.step() for _ in range(FOLLOW_STEPS)], dim=1)  # (P, steps, stats)
    for m, reference in enumerate(references):
        alone = torch.stack([reference.step() for _ in range(FOLLOW_STEPS)])  # (steps, stats)
        torch.testing.assert_close(packed[m, 0], alone[0], rtol=STEP1_RTOL, atol=0)
        torch.testing.assert_close(packed[m], alone, rtol=FOLLOW_RTOL, atol=1e-3)


@pytest.mark.parametrize("change", ["optim.lr_d=2.2e-4", "loss.lambda_cat=0.9"])
def test_the_tolerance_tells_a_changed_setting(tmp_path: Path, images: torch.Tensor, change: str) -> None:
    """STEP1_RTOL is tight enough that a member trained with another setting would fail the test above."""
    pack = make_pack([tiny_config(tmp_path, "seed=3")], images)
    changed = ReferenceTrainer(tiny_config(tmp_path, "seed=3", change), images, CPU)
    assert not torch.allclose(pack.step()[0], changed.step(), rtol=STEP1_RTOL, atol=0)


def test_members_do_not_influence_each_other(tmp_path: Path, images: torch.Tensor) -> None:
    """Another λ and a diverging learning rate for member 0: member 1 stays bit for bit the same."""
    other = tiny_config(tmp_path, *VARIED[2])
    calm = make_pack([tiny_config(tmp_path, "seed=3"), other], images)
    wild = make_pack([tiny_config(tmp_path, "seed=3", "loss.lambda_cat=3", "optim.lr_d=1e6"), other], images)
    for _ in range(5):
        calm_stats, wild_stats = calm.step(), wild.step()
        assert torch.equal(calm_stats[1], wild_stats[1])
    assert not wild_stats[0].isfinite().all() and calm_stats[0].isfinite().all()  # member 0 diverged there
    calm_state, wild_state = calm.member_state(1), wild.member_state(1)
    assert all(torch.equal(calm_state[k], wild_state[k]) for k in calm_state)


def test_each_member_steps_with_its_own_learning_rates(tmp_path: Path, images: torch.Tensor) -> None:
    """Three members of one seed (same batch, same gradients), one with G's learning rate doubled, one with
    D's: Adam's first update is lr·g/(|g| + ε), so their updates are the first one's, doubled where the rate is."""
    overrides = [(), ("optim.lr_g=2e-3",), ("optim.lr_d=4e-4",)]
    pack = make_pack([tiny_config(tmp_path, "seed=3", *o) for o in overrides], images)
    before = [parameters(pack, m) for m in range(3)]
    pack.step()
    after = [parameters(pack, m) for m in range(3)]
    d_updates = [update(before[m], after[m], "trunk") for m in range(3)]
    g_updates = [update(before[m], after[m], "generator") for m in (0, 1)]  # member 2's D moved otherwise
    torch.testing.assert_close(d_updates[1], d_updates[0], rtol=1e-5, atol=3e-7)  # parameters round to their ulp
    torch.testing.assert_close(d_updates[2], 2 * d_updates[0], rtol=1e-5, atol=3e-7)  # parameters round to their ulp
    torch.testing.assert_close(g_updates[1], 2 * g_updates[0], rtol=1e-5, atol=3e-7)  # parameters round to their ulp
    assert d_updates[0].abs().max() > 1e-4 and g_updates[0].abs().max() > 1e-4


def step_apart(pack: PackTrainer) -> list[dict[str, dict[str, torch.Tensor]]]:
    """D's step, then G's, on the next batch; each member's parameters before, between and after."""
    pack.next_batch()
    latent = pack.spec.latent(pack.draws)
    real = pack.images.float().div(255)  # (B, P, 28, 28)
    fake = pack.model.generator(latent.vector)
    states = [[parameters(pack, m) for m in range(pack.members)]]
    pack.step_d(real, fake, latent)
    states.append([parameters(pack, m) for m in range(pack.members)])
    pack.step_g(fake, latent)
    states.append([parameters(pack, m) for m in range(pack.members)])
    return [{"start": s, "after_d": d, "end": e} for s, d, e in zip(*states, strict=True)]


def test_q_head_steps_with_each_members_chosen_optimiser(tmp_path: Path, images: torch.Tensor) -> None:
    """`optim.q_optimizer`, per member in one pack: Q's head moves in D's step (`d`) or in G's (`g`, `own`)."""
    choices = ("d", "g", "own")
    pack = make_pack([tiny_config(tmp_path, f"optim.q_optimizer={q}") for q in choices], images)
    with_d, with_g, with_own = step_apart(pack)
    assert moved(with_d["start"], with_d["after_d"]) == {"trunk", "d_head", "q_head"}
    assert moved(with_d["after_d"], with_d["end"]) == {"generator"}
    for member in (with_g, with_own):
        assert moved(member["start"], member["after_d"]) == {"trunk", "d_head"}
        assert moved(member["after_d"], member["end"]) == {"generator", "q_head"}


@pytest.mark.parametrize("q_optimizer", ["d", "g"])
def test_info_loss_reaches_the_shared_trunk_in_the_d_step(
    tmp_path: Path, images: torch.Tensor, q_optimizer: str
) -> None:
    """Two members of one seed, λ 1 and 0: D's step leaves their shared trunks apart."""
    overrides = [(f"loss.lambda_cat={lam}", "loss.lambda_con=0", f"optim.q_optimizer={q_optimizer}") for lam in (1, 0)]
    with_info, without = step_apart(make_pack([tiny_config(tmp_path, *o) for o in overrides], images))
    assert with_info["start"]["trunk"].keys() == without["start"]["trunk"].keys()
    assert moved(with_info["after_d"], without["after_d"]) >= {"trunk"}


def test_info_loss_reaches_the_generator(tmp_path: Path, images: torch.Tensor) -> None:
    """From one state and the same fakes, G's step alone: λ changes G's update, and D's weights stay."""
    overrides = [(f"loss.lambda_cat={lam}", "loss.lambda_con=0") for lam in (1, 0)]
    pack = make_pack([tiny_config(tmp_path, *o) for o in overrides], images)
    pack.next_batch()
    latent = pack.spec.latent(pack.draws)
    fake = pack.model.generator(latent.vector)
    before = [parameters(pack, m) for m in range(2)]
    pack.step_g(fake, latent)
    after = [parameters(pack, m) for m in range(2)]
    assert moved(before[0], after[0]) == moved(before[1], after[1]) == {"generator"}
    assert not torch.equal(update(before[0], after[0], "generator"), update(before[1], after[1], "generator"))


def test_cross_entropy_is_taken_on_logits_and_each_member_has_its_own_std(tmp_path: Path, images: torch.Tensor) -> None:
    """Member 0 `continuous_std: fixed` (σ = 1 whatever Q's log-std outputs say), member 1 learned."""
    pack = make_pack([tiny_config(tmp_path, "loss.continuous_std=fixed"), tiny_config(tmp_path)], images)
    spec = pack.spec  # 10 logits, then 2 means and 2 log-stds
    codes = [[0.5, -0.25], [-1.0, 0.75]]
    means = [[0.1, 0.3], [-0.5, 0.0]]
    log_stds = [[0.7, -1.2], [2.0, -0.4]]
    logits = torch.zeros(2, 10)
    logits[0, 1] = logits[1, 2] = 20.0  # confident and right
    one = spec.build(torch.zeros(2, spec.noise), torch.tensor([[1], [2]]), torch.tensor(codes))
    latent = type(one)(*(t.expand(2, *t.shape) for t in one))  # (P=2, B=2, ...)
    q_out = torch.cat([logits, torch.tensor(means), torch.tensor(log_stds)], dim=1).expand(2, 2, 14)
    ce, nll = pack.info_terms(q_out, latent)
    assert ce.shape == (2, 1) and ce.max().item() < 1e-6  # a softmax before the cross-entropy: ~1.46 nats
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    # ½(c - μ)² per code (|c - μ|: 0.4 and 0.55, then 0.5 and 0.75) and ½·log 2π, summed over codes, batch mean
    by_hand_fixed = ((0.5 * 0.4**2 + 0.5 * 0.55**2) + (0.5 * 0.5**2 + 0.5 * 0.75**2)) / 2 + 2 * half_log_2pi
    by_hand_learned = (
        sum(
            0.5 * ((c - m) / math.exp(s)) ** 2 + s + half_log_2pi
            for row in range(2)
            for c, m, s in zip(codes[row], means[row], log_stds[row], strict=True)
        )
        / 2
    )
    assert nll[0].item() == pytest.approx(by_hand_fixed) and nll[1].item() == pytest.approx(by_hand_learned)
    assert abs(by_hand_learned - by_hand_fixed) > 1.0


def test_non_finite_losses_raise_divergence(tmp_path: Path, images: torch.Tensor) -> None:
    pack = make_pack([tiny_config(tmp_path)], images)
    assert pack.log_values([1.0, 0.5, 2.0, 2.2, 1.9])["loss/d"] == 1.0
    with pytest.raises(DivergenceError, match="non-finite"):
        pack.log_values([float("nan"), 1.0, 1.0, 0.0, 2.0])


@pytest.mark.slow
def test_select_goes_on_with_the_kept_members_where_they_were(tmp_path: Path, images: torch.Tensor) -> None:
    """After select([2, 0]) the kept members have their weights, Adam state and generators, and their next
    step is the one they would have taken in the full pack."""
    configs = varied(tmp_path)
    full, pack = make_pack(configs, images), make_pack(configs, images)
    for _ in range(3):
        full.step(), pack.step()
    pack.select([2, 0])
    for kept, was in ((0, 2), (1, 0)):
        state, full_state = pack.member_state(kept), full.member_state(was)
        assert all(torch.equal(state[k], full_state[k]) for k in state)
        for optimiser, full_optimiser in ((pack.opt_d, full.opt_d), (pack.opt_q, full.opt_q)):
            assert torch.equal(optimiser.members["steps"][kept], full_optimiser.members["steps"][was])
            assert all(
                torch.equal(a.unflatten(0, (2, -1))[kept], b.unflatten(0, (3, -1))[was])
                for a, b in zip(optimiser.exp_avg_sq, full_optimiser.exp_avg_sq, strict=True)
            )
    stats, full_stats = pack.step(), full.step()
    assert torch.equal(pack.images, full.images[:, [2, 0]]) and torch.equal(pack.draws.noise, full.draws.noise[[2, 0]])
    torch.testing.assert_close(stats, full_stats[[2, 0]], rtol=STEP1_RTOL, atol=0)


def test_the_step_does_the_unpacked_steps_arithmetic(tmp_path: Path, images: torch.Tensor) -> None:
    """As many FLOPs as the unpacked step: in G's step D's weights get no gradient (0.288 GFLOP an image)."""
    cfg = tiny_config(tmp_path)
    with FlopCounterMode(display=False) as packed:
        make_pack([cfg], images).step()
    with FlopCounterMode(display=False) as unpacked:
        ReferenceTrainer(cfg, images, CPU).step()
    assert packed.get_total_flops() == unpacked.get_total_flops()
    assert packed.get_total_flops() / 32 == pytest.approx(0.288e9, rel=0.01)


# -- float64: the pack is the reference to rounding ------------------------------------------------------------

DISTINCT = (  # members that differ in every setting a member may, each lr_g ≠ its lr_d
    ("seed=3", "optim.lr_d=2e-4", "optim.lr_g=1e-3", "optim.beta1=0.5", "optim.beta2=0.999"),
    ("seed=4", "optim.lr_d=3e-4", "optim.lr_g=5e-4", "optim.beta1=0.7", "optim.beta2=0.99", "optim.q_optimizer=g"),
    ("seed=5", "optim.lr_d=1e-4", "optim.lr_g=2e-3", "optim.beta1=0.3", "optim.beta2=0.95", "optim.q_optimizer=own"),
)
LOSSES = (
    ("loss.lambda_cat=1.0", "loss.lambda_con=0.1", "loss.continuous_std=learned"),
    ("loss.lambda_cat=0.5", "loss.lambda_con=1.0", "loss.continuous_std=fixed"),
    ("loss.lambda_cat=2.0", "loss.lambda_con=0.3", "loss.continuous_std=learned"),
)
RECIPES = (  # issue 15's: spectral norm, instance noise and Q's own Adam
    ("model.spectral_norm=none", "loss.instance_noise=0"),
    ("model.spectral_norm=d", "loss.instance_noise=0.2"),
    ("model.spectral_norm=dq", "loss.instance_noise=0.1", "optim.lr_q=3e-3", "optim.q_beta1=0.6", "optim.q_beta2=0.9"),
)
F64_RTOL, F64_STEPS, F64_BATCH = 1e-9, 10, "optim.batch_size=8"  # float64 convolutions are slow on the CPU
MOMENTS_RTOL = 1e-8  # Adam's moments: measured ≤ 6.6e-10, too near F64_RTOL to be reliable on other machines


@pytest.fixture
def float64() -> Iterator[None]:
    """float64 as the default dtype (models, latents, the pack's per-member scalars), restored after."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def pack_moments(pack: PackTrainer, member: int) -> dict[str, torch.Tensor]:
    """A member's Adam state by parameter name: `name/exp_avg`, `name/exp_avg_sq` and `name/step`."""
    names = {id(p): name for name, p in pack.model.named_parameters()}
    moments = {}
    for adam in (pack.opt_d, pack.opt_g, pack.opt_q):
        for param, exp_avg, exp_avg_sq in zip(adam.params, adam.exp_avg, adam.exp_avg_sq, strict=True):
            name = names[id(param)]
            moments[f"{name}/exp_avg"] = exp_avg.unflatten(0, (pack.members, -1))[member]
            moments[f"{name}/exp_avg_sq"] = exp_avg_sq.unflatten(0, (pack.members, -1))[member]
            moments[f"{name}/step"] = adam.members["steps"][member, 0]
    return moments


def reference_moments(reference: ReferenceTrainer) -> dict[str, torch.Tensor]:
    """`pack_moments` of the unpacked trainer's torch.optim.Adam."""
    names = {id(p): name for name, p in reference.model.named_parameters()}
    moments = {}
    for adam in (reference.opt_d, reference.opt_g, *([reference.opt_q] if reference.opt_q else [])):
        for param, state in adam.state.items():
            name = names[id(param)]
            moments |= {f"{name}/{key}": state[key] for key in ("exp_avg", "exp_avg_sq", "step")}
    return moments


def relative_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖actual - expected‖ / ‖expected‖ of each tensor (Frobenius norms; an integer tensor: 0 where equal)."""
    assert actual.keys() == expected.keys()
    return {
        key: ((actual[key].double() - value.double()).norm() / value.double().norm().clamp(min=1e-300)).item()
        for key, value in expected.items()
    }


@pytest.mark.slow
def test_in_float64_a_member_is_its_unpacked_run_to_rounding(
    tmp_path: Path, images: torch.Tensor, float64: None
) -> None:
    """Members differing in every setting, F64_STEPS steps: each step's stats within F64_RTOL elementwise, the
    final weights and BatchNorm statistics within F64_RTOL in norm, Adam's moments within MOMENTS_RTOL, its step
    counts exactly."""
    configs = [tiny_config(tmp_path, *o, F64_BATCH) for o in distinct_overrides()]
    pack = make_pack(configs, images)
    references = [ReferenceTrainer(cfg, images, CPU) for cfg in configs]
    for step in range(F64_STEPS):
        stats = pack.step()
        assert stats.dtype == torch.float64
        for m, reference in enumerate(references):
            torch.testing.assert_close(stats[m], reference.step(), rtol=F64_RTOL, atol=0, msg=f"step {step + 1}")
    for m, reference in enumerate(references):
        weights = relative_errors(pack.member_state(m), reference.model.state_dict())
        moments = relative_errors(pack_moments(pack, m), reference_moments(reference))
        assert max(weights.values()) <= F64_RTOL, weights
        assert max(moments.values()) <= MOMENTS_RTOL, moments
        assert all(moments[k] == 0 for k in moments if k.endswith("/step"))


# -- each setting is its member's own --------------------------------------------------------------------------

CHANGES = {  # a new value of each per-member setting, for member (changed) of DISTINCT
    "seed": (1, "seed=9"),
    "lr_d": (1, "optim.lr_d=4e-4"),
    "lr_g": (1, "optim.lr_g=7e-4"),
    "beta1": (1, "optim.beta1=0.8"),
    "beta2": (1, "optim.beta2=0.9"),
    "lambda_cat": (1, "loss.lambda_cat=1.5"),
    "lambda_con": (1, "loss.lambda_con=0.2"),
    "continuous_std": (1, "loss.continuous_std=learned"),
    "q_optimizer": (1, "optim.q_optimizer=d"),
    "lr_q": (2, "optim.lr_q=1e-3"),
    "q_beta1": (2, "optim.q_beta1=0.8"),
    "q_beta2": (2, "optim.q_beta2=0.99"),
    "spectral_norm": (1, "model.spectral_norm=dq"),
    "instance_noise": (1, "loss.instance_noise=0.4"),
}
CHANGE_STEPS, CHANGE_BATCH = 2, "optim.batch_size=8"  # Adam's betas act from its second step on


def distinct_overrides() -> list[tuple[str, ...]]:
    return [(*a, *b, *c) for a, b, c in zip(DISTINCT, LOSSES, RECIPES, strict=True)]


def run_distinct(
    tmp_path: Path, images: torch.Tensor, changed: int = 0, change: str = ""
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """DISTINCT members for CHANGE_STEPS steps, member `changed` with `change`: stats (P, steps, stats) and
    each member's final state dict."""
    overrides = [(*o, CHANGE_BATCH) for o in distinct_overrides()]
    overrides[changed] = (*overrides[changed], *([change] if change else []))
    pack = make_pack([tiny_config(tmp_path, *o) for o in overrides], images)
    stats = torch.stack([pack.step() for _ in range(CHANGE_STEPS)], dim=1)
    return stats, [{k: v.clone() for k, v in pack.member_state(m).items()} for m in range(pack.members)]


@pytest.fixture(scope="module")
def unchanged(
    tmp_path_factory: pytest.TempPathFactory, images: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return run_distinct(tmp_path_factory.mktemp("unchanged"), images)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(CHANGES))
def test_a_setting_changes_its_member_only(
    tmp_path: Path,
    images: torch.Tensor,
    unchanged: tuple[torch.Tensor, list[dict[str, torch.Tensor]]],
    setting: str,
) -> None:
    """A member with another `setting`: its weights move (a Q beta acts on its second update, the step's last
    move: on no loss of these steps), the other members' stats and weights stay bit for bit."""
    changed, change = CHANGES[setting]
    stats, states = run_distinct(tmp_path, images, changed, change)
    before_stats, before_states = unchanged
    for m in {0, 1, 2} - {changed}:
        assert torch.equal(stats[m], before_stats[m]), f"member {m}'s stats"
        assert all(torch.equal(states[m][k], before_states[m][k]) for k in states[m]), f"member {m}'s weights"
    assert any(not torch.equal(states[changed][k], before_states[changed][k]) for k in states[changed])


# -- the recipes' arithmetic ------------------------------------------------------------------------------------


def test_spectral_norm_divides_each_members_weight_by_its_own_largest_singular_value() -> None:
    """Two members' weights diag(3, 1) and diag(0.5, 2): after power iterations, weights diag(1, 1/3) and
    diag(0.25, 1); a third member without spectral norm keeps its weight."""
    layer = PackedLinear(3, 2, 2, bias=False, spectral=True)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([torch.diag(torch.tensor(d)) for d in ([3.0, 1.0], [0.5, 2.0], [4.0, 1.0])]))
    layer.spectral = torch.tensor([True, True, False])
    for _ in range(20):  # each training forward steps the power iteration
        layer(torch.zeros(1, 6))
    normed = layer(torch.eye(6)[[0, 1, 2, 3, 4, 5]]).detach()  # row i: the weights' column i, member-blocked
    expected = torch.block_diag(torch.diag(torch.tensor([1, 1 / 3])), torch.diag(torch.tensor([0.25, 1.0])))
    torch.testing.assert_close(normed[:4, :4], expected)
    torch.testing.assert_close(normed[4:, 4:], torch.diag(torch.tensor([4.0, 1.0])))


def test_spectral_norm_matches_torchs_on_the_unpacked_layer() -> None:
    """SNConv2d with `spectral` on against torch.nn.utils.parametrizations.spectral_norm, both converged."""
    torch.manual_seed(0)
    ours = SNConv2d(3, 5)
    ours.spectral = True
    theirs = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(3, 5, 4, 2, 1), n_power_iterations=50)
    with torch.no_grad():
        theirs.parametrizations.weight.original.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(50):
        ours(x)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_instance_noise_anneals_linearly_to_zero(tmp_path: Path, images: torch.Tensor) -> None:
    """Std 0.4 over 4 steps: 0.4, 0.3, 0.2, 0.1 at steps 1-4; a member without noise draws none."""
    configs = [tiny_config(tmp_path, "steps=4", "loss.instance_noise=0.4"), tiny_config(tmp_path, "steps=4")]
    pack = make_pack(configs, images)
    assert pack.noise is not None
    stds = []
    for _ in range(4):
        pack.next_batch()
        stds.append(pack.noise_std.tolist())
        assert pack.noise[1].eq(0).all() and pack.noise[0].std().item() == pytest.approx(1, abs=0.05)
    torch.testing.assert_close(torch.tensor(stds), torch.tensor([[0.4, 0.0], [0.3, 0.0], [0.2, 0.0], [0.1, 0.0]]))


# -- checkpoints ------------------------------------------------------------------------------------------------


def test_members_go_on_from_their_checkpoints_exactly(tmp_path: Path, images: torch.Tensor) -> None:
    """Two members (one with every recipe) on 40 images at batch 8, an epoch of 5 steps: checkpointed at step 7,
    a new pack made from the checkpoints steps 8 more (across an epoch's new batch order) as the first one does."""
    overrides = [("seed=3",), ("seed=4", "model.spectral_norm=dq", "loss.instance_noise=0.3", "optim.q_optimizer=own")]
    configs = [tiny_config(tmp_path, *o, "optim.batch_size=8") for o in overrides]
    few = images[:40]
    pack = make_pack(configs, few)
    for _ in range(7):
        pack.step()
    checkpoints = [pack.member_checkpoint(m) for m in range(2)]
    models = [initial_model(cfg, CPU) for cfg in configs]
    for model, checkpoint in zip(models, checkpoints, strict=True):
        model.load_state_dict(checkpoint["model"])
    resumed = PackTrainer(configs, models, few, CPU)
    for m, checkpoint in enumerate(checkpoints):
        resumed.load_member_checkpoint(m, checkpoint)
    for _ in range(8):
        assert torch.equal(pack.step(), resumed.step())
    for m in range(2):
        assert all(torch.equal(v, resumed.member_state(m)[k]) for k, v in pack.member_state(m).items())
