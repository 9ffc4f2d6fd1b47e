"""Adam for a pack: each parameter holds P members' blocks along dim 0, each member with its own learning rate
and betas, and a member can sit a step out.

`torch.optim.Adam` takes one learning rate per parameter group, and a packed parameter is one tensor holding
every member, so it cannot give members their own; splitting members into separate tensors would cost a
concatenation of all weights every step. This is torch.optim.Adam's arithmetic (its single-tensor path; no
weight decay, no amsgrad) with the scalars as (P,) tensors: no host scalar changes from step to step, so the
update can be captured in a CUDA graph, and it runs on CPU, CUDA and MPS. The scalars take the parameters'
dtype (float64 on the CPU where tests compare against torch.optim.Adam to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EPS = 1e-8  # torch.optim.Adam's default


class BatchedAdam:
    """Adam over `params`, each (P·k, ...) with member p's block at [p·k, (p+1)·k). `members` holds the (P, 1)
    per-member tensors: lr, ln β1, ln β2, 1 - β1, 1 - β2 and each member's step count, its own (a member left
    out of a step keeps its count)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        members: dict[str, torch.Tensor],
        exp_avg: Sequence[torch.Tensor] | None = None,
        exp_avg_sq: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.params, self.members = list(params), members
        self.count = len(members["lr"])
        self.exp_avg = list(exp_avg) if exp_avg is not None else [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = list(exp_avg_sq) if exp_avg_sq is not None else [torch.zeros_like(p) for p in self.params]

    @classmethod
    def create(
        cls, params: Sequence[torch.Tensor], lr: Sequence[float], beta1: Sequence[float], beta2: Sequence[float]
    ) -> BatchedAdam:
        """A fresh optimiser, each member with its learning rate and betas."""
        device, dtype = params[0].device, params[0].dtype

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)  # (P, 1)

        def log(values: Sequence[float]) -> torch.Tensor:
            return column([math.log(b) if b > 0 else -math.inf for b in values])

        # 1 - β^t as -expm1(t·ln β), ln β taken in float64 here: in float32, 1 - 0.999^t would lose four digits
        # to cancellation, against torch.optim.Adam's float64 host scalars.
        members = {
            "lr": column(lr),
            "log_beta1": log(beta1),
            "log_beta2": log(beta2),
            "one_minus_beta1": column([1 - b for b in beta1]),
            "one_minus_beta2": column([1 - b for b in beta2]),
            "steps": column([0.0] * len(lr)),
        }
        return cls(params, members)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], active: torch.Tensor | None = None) -> None:
        """One Adam step of every member, or of the members where `active` (P,) is 1 (float 0/1): the others'
        parameters and moments stay exactly as they are, as long as their gradients are finite. Eight passes
        over each parameter's size (torch.optim.Adam's single-tensor step: seven)."""
        h = self.members
        on = torch.ones_like(h["steps"]) if active is None else active.view(-1, 1)  # (P, 1)
        h["steps"].add_(on)
        steps = h["steps"].clamp(min=1)  # a member that never stepped: any finite correction, it moves by 0
        bias_correction1 = -torch.expm1(steps * h["log_beta1"])  # (P, 1): 1 - β1^t
        bias_correction2_sqrt = (-torch.expm1(steps * h["log_beta2"])).sqrt()
        step_size = h["lr"] / bias_correction1 * on  # 0: the parameter stays
        weight1 = h["one_minus_beta1"] * on  # 0: the first moment stays
        weight2 = h["one_minus_beta2"] * on  # 0: the second moment stays
        for param, grad, exp_avg, exp_avg_sq in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            p, g = param.view(self.count, -1), grad.reshape(self.count, -1)  # (P, n): a row per member
            m, v = exp_avg.view(self.count, -1), exp_avg_sq.view(self.count, -1)
            m.lerp_(g, weight1)  # β1·m + (1 - β1)·g
            v.lerp_(g.square(), weight2)  # β2·v + (1 - β2)·g²
            denom = v.sqrt().div_(bias_correction2_sqrt).add_(EPS).div_(-step_size)  # -inf where it stays
            p.addcdiv_(m, denom)  # p - step_size·m / (√v̂ + ε)

    def member_state(self, member: int) -> dict[str, list[torch.Tensor]]:
        """Member `member`'s moments (one per parameter) and its per-member scalars, copied out of the pack."""
        return {
            "exp_avg": [t.unflatten(0, (self.count, -1))[member].clone() for t in self.exp_avg],
            "exp_avg_sq": [t.unflatten(0, (self.count, -1))[member].clone() for t in self.exp_avg_sq],
            "members": [self.members[name][member].clone() for name in sorted(self.members)],
        }

    @torch.no_grad()
    def load_member_state(self, member: int, state: dict[str, list[torch.Tensor]]) -> None:
        """Put a `member_state` back into member `member`'s place, exactly."""
        for mine, saved in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
            for tensor, value in zip(mine, saved, strict=True):
                tensor.unflatten(0, (self.count, -1))[member].copy_(value)
        for name, value in zip(sorted(self.members), state["members"], strict=True):
            self.members[name][member].copy_(value)

    def select(self, keep: Sequence[int], params: Sequence[torch.Tensor]) -> BatchedAdam:
        """This optimiser's state for the members `keep` (indices, in that order), over `params`: the same
        parameters in a pack of those members."""
        index = torch.tensor(list(keep), device=self.members["lr"].device)
        members = {name: value[index] for name, value in self.members.items()}
        exp_avg = [select_members(t, self.count, index) for t in self.exp_avg]
        exp_avg_sq = [select_members(t, self.count, index) for t in self.exp_avg_sq]
        return BatchedAdam(params, members, exp_avg, exp_avg_sq)


def select_members(tensor: torch.Tensor, members: int, index: torch.Tensor) -> torch.Tensor:
    """The blocks of members `index` of a (P·k, ...) tensor: (len(index)·k, ...)."""
    return tensor.unflatten(0, (members, -1))[index].flatten(0, 1)
