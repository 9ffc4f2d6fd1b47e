"""Train InfoGANs: `train(cfg, listeners) -> TrainResult` trains one; `train_pack(groups)` trains several in
lockstep, evaluated at the same steps (a trial's seeds). Knows neither MLflow nor Optuna: each log window, each
evaluation and each checkpoint goes to the listeners; a group may go on from its members' checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import signals
from harness.checkpoint import check_checkpoint, member_checkpoint, set_global_generators
from harness.config import TrainConfig, flatten
from harness.data import load_dataset
from harness.device import resolve_device
from harness.evaluate import Evaluation, Evaluator, HeldOut, held_out_for
from harness.latent import LatentSpec
from harness.pack import PackTrainer
from harness.seeding import initial_model


@dataclass(frozen=True)
class RunInfo:
    device: str
    data_source: str
    data_location: str
    train_images: int
    test_images: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    metrics: dict[str, float]  # the last log window and the last evaluation
    weights: dict[str, object] = field(repr=False)  # state dicts + latent layout; torch.save-able
    info: RunInfo
    seconds: float


class TrainListener:
    """Receives progress; every hook may raise to stop training (e.g. to prune)."""

    def on_start(self, info: RunInfo, cfg: TrainConfig) -> None: ...

    def on_log(self, step: int, values: dict[str, float]) -> None: ...

    def on_eval(self, evaluation: Evaluation) -> None: ...

    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None:
        """All the member needs to go on from `step` (`harness.checkpoint`), to keep; torch.save-able."""


class GroupListener:
    """Sees each round of a group of pack members trained together (a trial's seeds): the log values, or the
    evaluations, of all its members at one step, in member order. Raising stops every member of the group."""

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None: ...

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None: ...

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None: ...

    def on_stop(self, error: Exception) -> None:
        """The group stopped early (pruned, diverged, a listener's error): its members train no more."""


@dataclass(frozen=True)
class Group:
    """Members that stand or fall together: one config each (e.g. one seed each), each member's own
    listeners, the listeners of the group's rounds, and the checkpoints it goes on from (one per member, all
    of one step; `harness.checkpoint.check_checkpoint` has checked them) or none."""

    configs: Sequence[TrainConfig]
    listeners: Sequence[Sequence[TrainListener]]
    watchers: Sequence[GroupListener] = ()
    resume: Sequence[dict[str, Any]] = ()


@dataclass(frozen=True)
class GroupOutcome:
    results: list[TrainResult]  # one per member; empty when the group stopped
    error: Exception | None  # what stopped it: a listener's exception (a pruned trial), a diverging loss


SHARED_KEYS = (  # across a pack
    "data",
    "codes",
    "optim.batch_size",
    "steps",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "device",
)


class Member:
    """One InfoGAN of a pack as its listeners see it: its config, its evaluator (latents fixed from its seed),
    its every metric's last value, and an InfoGAN into which the pack's state of it is loaded for evaluation
    and for the final weights."""

    def __init__(
        self, cfg: TrainConfig, held_out: HeldOut, device: torch.device, checkpoint: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.model = initial_model(cfg, device)  # the initial weights, from its seed
        self.evaluate = Evaluator(LatentSpec.from_config(cfg.codes), held_out, cfg.seed, device)  # drawn again
        self.last: dict[str, float] = {}
        self.checkpoint = checkpoint
        if checkpoint is not None:  # where it stopped: its weights and statistics, its metrics' last values
            check_checkpoint(checkpoint, cfg, self.model.state_dict())
            self.model.load_state_dict(checkpoint["pack"]["model"])
            self.last.update(checkpoint["last"])

    def evaluation(self, state: dict[str, torch.Tensor], step: int) -> Evaluation:
        self.model.load_state_dict(state)
        evaluation = self.evaluate(self.model, step)
        self.last.update(evaluation.metrics)
        return evaluation

    def weights(self, state: dict[str, torch.Tensor]) -> dict[str, object]:
        """The state dicts of its modules, and the latent layout: torch.save-able."""
        self.model.load_state_dict(state)
        parts = ("generator", "trunk", "d_head", "q_head")
        weights: dict[str, object] = {name: getattr(self.model, name).state_dict() for name in parts}
        codes = self.cfg.codes
        return weights | {
            "latent": {"noise": codes.noise, "categorical": list(codes.categorical), "continuous": codes.continuous}
        }


def check_packable(configs: Sequence[TrainConfig]) -> None:
    """Members of a pack share what makes them step and evaluate together; ValueError names what differs."""
    first = flatten(configs[0].model_dump())
    for cfg in configs[1:]:
        flat = flatten(cfg.model_dump())
        differ = [k for k in flat if k.startswith(SHARED_KEYS) and flat[k] != first[k]]
        if differ:
            raise ValueError(f"pack members must share {', '.join(differ)}")


def pack_key(cfg: TrainConfig) -> str:
    """The values of SHARED_KEYS: configs with the same key can train in one pack."""
    flat = flatten(cfg.model_dump(mode="json"))
    return json.dumps({k: v for k, v in flat.items() if k.startswith(SHARED_KEYS)}, sort_keys=True)


class PackRun:
    """The groups of one `train_pack` call, their members, which groups have stopped and why, and the fused
    pack of the members still training (None once none is)."""

    def __init__(self, groups: Sequence[Group], info: RunInfo, held_out: HeldOut, train_images: torch.Tensor) -> None:
        self.groups, self.info, self.held_out = groups, info, held_out
        self.errors: dict[int, Exception] = {}
        self.members: dict[int, list[Member]] = {}
        self.each_live(self.start)
        self.slots = [(g, i) for g, group in self.members.items() for i in range(len(group))]  # the pack's rows
        models = [self.members[g][i] for g, i in self.slots]
        device = train_images.device
        self.pack = (
            PackTrainer([m.cfg for m in models], [m.model for m in models], train_images, device) if models else None
        )
        self.step = 0  # where training goes on from: 0, or the step of the members' checkpoints
        for slot, member in enumerate(models):
            if member.checkpoint is not None and self.pack is not None:
                self.pack.load_member_checkpoint(slot, member.checkpoint["pack"])
                set_global_generators(member.checkpoint["generators"])  # the process's, alike in every member's
                self.step = member.checkpoint["step"]

    def each_live(self, work: Callable[[int, Group], None]) -> None:
        """Run `work` for each group still training; an exception stops that group alone."""
        for g, group in enumerate(self.groups):
            if g in self.errors:
                continue
            try:
                work(g, group)
            except Exception as err:  # a pruned trial, a diverging loss, any error of its listeners
                self.errors[g] = err
                for watcher in group.watchers:
                    watcher.on_stop(err)

    def start(self, g: int, group: Group) -> None:
        for cfg, listeners in zip(group.configs, group.listeners, strict=True):
            for listener in listeners:
                listener.on_start(self.info, cfg)
        for watcher in group.watchers:
            watcher.on_start(self.info, group.configs)
        device = torch.device(self.info.device)
        resume: list[dict[str, Any] | None] = list(group.resume) or [None] * len(group.configs)
        pairs = zip(group.configs, resume, strict=True)
        self.members[g] = [Member(cfg, self.held_out, device, checkpoint) for cfg, checkpoint in pairs]

    def state(self, g: int, i: int) -> dict[str, torch.Tensor]:
        """Member i of group g's InfoGAN state, out of the pack."""
        assert self.pack is not None, "a live group's members are in the pack"
        return self.pack.member_state(self.slots.index((g, i)))

    def evaluate(self, step: int) -> None:
        def work(g: int, group: Group) -> None:
            evaluations = [member.evaluation(self.state(g, i), step) for i, member in enumerate(self.members[g])]
            for evaluation, listeners in zip(evaluations, group.listeners, strict=True):
                for listener in listeners:
                    listener.on_eval(evaluation)
            for watcher in group.watchers:
                watcher.on_eval_round(step, evaluations)

        self.each_live(work)

    def log(self, step: int, means: list[list[float]], images_per_s: float) -> None:
        """`means`: a row of the window's mean step stats per pack member."""

        def work(g: int, group: Group) -> None:
            assert self.pack is not None
            values = [
                self.pack.log_values(means[self.slots.index((g, i))]) | {"perf/images_per_s": images_per_s}
                for i in range(len(self.members[g]))
            ]  # a diverging member raises here: its group stops
            for member, member_values, listeners in zip(self.members[g], values, group.listeners, strict=True):
                member.last.update(member_values)
                for listener in listeners:
                    listener.on_log(step, member_values)
            for watcher in group.watchers:
                watcher.on_log_round(step, values)

        self.each_live(work)

    def restored_window(self) -> tuple[torch.Tensor | None, int]:
        """The half-filled log window the checkpoints held: each member's summed stats (P, stats), and its steps."""
        assert self.pack is not None
        checkpoints = [self.members[g][i].checkpoint for g, i in self.slots]
        windows = [c["window"] for c in checkpoints if c is not None]
        if not windows or windows[0]["sum"] is None:
            return None, 0
        return torch.stack([w["sum"] for w in windows]).to(self.pack.device), windows[0]["steps"]

    def checkpoint(self, step: int, window: torch.Tensor | None, window_steps: int) -> None:
        """Each live member's checkpoint at `step`, to its listeners."""

        def work(g: int, group: Group) -> None:
            assert self.pack is not None
            for i, (member, listeners) in enumerate(zip(self.members[g], group.listeners, strict=True)):
                slot = self.slots.index((g, i))
                state = self.pack.member_checkpoint(slot)
                row = None if window is None else window[slot]
                checkpoint = member_checkpoint(member.cfg, step, state, row, window_steps, member.last)
                for listener in listeners:
                    listener.on_checkpoint(step, checkpoint)

        self.each_live(work)

    def drop_stopped(self, window: torch.Tensor | None) -> torch.Tensor | None:
        """The members of groups that stopped leave the pack, so they cost nothing from the next step on;
        returns the rows of `window` (P, stats) that stay."""
        keep = [k for k, (g, _) in enumerate(self.slots) if g not in self.errors]
        if self.pack is None or len(keep) == len(self.slots):
            return window
        self.slots = [self.slots[k] for k in keep]
        if not keep:
            self.pack = None
            return None
        self.pack.select(keep)
        return window[keep] if window is not None else None

    def outcomes(self, steps: int, seconds: float) -> list[GroupOutcome]:
        def results(g: int) -> list[TrainResult]:
            return [
                TrainResult(steps, member.last, member.weights(self.state(g, i)), self.info, seconds)
                for i, member in enumerate(self.members[g])
            ]

        return [
            GroupOutcome([], self.errors[g]) if g in self.errors else GroupOutcome(results(g), None)
            for g in range(len(self.groups))
        ]


def train_pack(groups: Sequence[Group]) -> list[GroupOutcome]:
    """Train every member of every group as one fused model (`harness.pack`), evaluated at the same steps,
    each as it would train alone. A group stops as a whole when one of its members' losses diverges or one of
    its listeners raises; the others go on, and the stopped group's members leave the pack. Ctrl-C stops them
    all."""
    started = time.perf_counter()
    configs = [cfg for group in groups for cfg in group.configs]
    check_packable(configs)
    shared = configs[0]
    device = resolve_device(shared.device)
    data = load_dataset(shared.data).to(device)
    info = RunInfo(str(device), data.source, data.location, len(data.train_images), len(data.test_images))
    held_out = held_out_for(data, device, with_properties=shared.codes.continuous > 0)
    starts = {c["step"] for group in groups for c in group.resume} | {0 for group in groups if not group.resume}
    if len(starts) > 1:
        raise ValueError(f"the groups of a pack go on from one step, not from steps {sorted(starts)}")
    run = PackRun(groups, info, held_out, data.train_images)
    if run.step == 0:
        # A step-0 evaluation: the chance-level baseline; it also makes eval/* each run's first metrics,
        # which the MLflow compare view picks by default.
        run.evaluate(0)
    window, window_steps = run.restored_window() if run.step else (None, 0)  # (P, stats): stats summed over the window
    window_start, window_paused = time.perf_counter(), 0.0
    every = shared.eval_every if shared.checkpoint_every is None else shared.checkpoint_every
    done = run.step  # the last step whose update, log, evaluation and checkpoint are all through
    try:
        for step in range(run.step + 1, shared.steps + 1):
            window = run.drop_stopped(window)
            if run.pack is None:
                break
            with signals.deferred():  # Ctrl-C and SIGTERM land between steps: a checkpoint of a whole step
                stats = run.pack.step()
                window, window_steps = (stats if window is None else window + stats), window_steps + 1
                if step % shared.log_every == 0 or step == shared.steps:
                    seconds = time.perf_counter() - window_start - window_paused  # evaluations excluded
                    means = (window / window_steps).tolist()  # the one host sync of a log window
                    run.log(step, means, window_steps * run.pack.batch_size / seconds)
                    window, window_steps, window_start, window_paused = None, 0, time.perf_counter(), 0.0
                if step % shared.eval_every == 0 or step == shared.steps:
                    began = time.perf_counter()
                    run.evaluate(step)
                    window_paused += time.perf_counter() - began
                if every and step % every == 0 and step < shared.steps:
                    began = time.perf_counter()
                    run.checkpoint(step, window, window_steps)
                    window_paused += time.perf_counter() - began
                done = step
    except KeyboardInterrupt:  # preemption's SIGTERM, or Ctrl-C: no step is lost
        if every and done % every and done < shared.steps and run.pack is not None:
            with signals.ignored():
                run.checkpoint(done, window, window_steps)
        raise
    return run.outcomes(shared.steps, time.perf_counter() - started)


Trainer = Callable[[Sequence[Group]], list[GroupOutcome]]  # what trains groups: train_pack; a stub in the stress test


def train(
    cfg: TrainConfig, listeners: Sequence[TrainListener] = (), resume: dict[str, Any] | None = None
) -> TrainResult:
    """Train one InfoGAN on `cfg` (a pack of one), from step 0 or from a checkpoint; all randomness comes from
    `cfg.seed`. What stops it (a diverging loss, a listener's exception, an unusable checkpoint) is raised."""
    (outcome,) = train_pack([Group([cfg], [listeners], resume=[resume] if resume else [])])
    if outcome.error is not None:
        raise outcome.error
    return outcome.results[0]
