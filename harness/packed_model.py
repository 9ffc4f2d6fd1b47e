"""InfoGAN's modules for a pack: P members of one architecture as one model, every layer grouped by member.

Activations are member-blocked channels: member p's features are channels [p·C, (p+1)·C) of a (B, P·C, ...)
tensor, so convolutions are grouped convolutions (`groups=P`), BatchNorm over P·C channels keeps each member's
own batch statistics, and the fully connected layers are batched matmuls. Every tensor of the state dict is
the members' tensors of `harness.model.InfoGAN` (same keys) concatenated along dim 0: `pack_states` and
`member_state` go between the two, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.model import LEAK, spectral_norms


class ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class PackedLinear(nn.Module):
    """P independent `nn.Linear(in_features, out_features)`: (B, P·in) -> (B, P·out), one batched matmul.
    `spectral`: a layer of D or Q, with `harness.model.SNLinear`'s buffer and each member's spectral norm."""

    u: torch.Tensor  # registered where `spectral`

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool, spectral: bool = False) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members * out_features, in_features))  # member p: rows p·out...
        self.bias = nn.Parameter(torch.empty(members * out_features)) if bias else None
        self.spectral: torch.Tensor | None = None
        if spectral:
            self.register_buffer("u", torch.full((members * out_features,), out_features**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = member_normed_weight(self)
        if self.members == 1:  # nn.Linear's own kernel and layouts: no permuted views, as fast as unpacked
            return F.linear(x, weight, self.bias)
        batch, members = x.shape[0], self.members
        # y^T = W x^T per member, so that W's gradient comes out in W's layout (P, out, in), not transposed.
        # x's gradient comes out (P, in, B), a transposed view of (B, P·in): made contiguous once here, so that
        # the layers below (BatchNorm's and the activations' backward) run on contiguous gradients.
        x_t = ContiguousGrad.apply(x).view(batch, members, self.in_features).permute(1, 2, 0)  # (P, in, B)
        weight = weight.view(members, self.out_features, self.in_features)  # (P, out, in)
        if self.bias is None:
            y_t = torch.bmm(weight, x_t)  # (P, out, B)
        else:
            y_t = torch.baddbmm(self.bias.view(members, self.out_features, 1), weight, x_t)
        return y_t.permute(2, 0, 1).reshape(batch, members * self.out_features)  # (B, P·out)


class PackedConv2d(nn.Conv2d):
    """P `harness.model.SNConv2d` (4x4, stride 2, padding 1) as one grouped convolution, each member's weight
    spectrally normalised where `spectral` (P,) is on."""

    u: torch.Tensor

    def __init__(self, members: int, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(members * in_channels, members * out_channels, 4, 2, 1, bias=bias, groups=members)
        self.members = members
        self.spectral: torch.Tensor | None = None
        self.register_buffer("u", torch.full((members * out_channels,), out_channels**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, member_normed_weight(self), self.bias)


def member_normed_weight(layer: PackedLinear | PackedConv2d) -> torch.Tensor:
    """The layer's weight, each member's block divided by its own spectral norm where `layer.spectral` (P,) is
    on (None: none is); in training, those members' power iterations step."""
    if layer.spectral is None:
        return layer.weight
    members = layer.members
    w = layer.weight.view(members, len(layer.weight) // members, -1)  # (P, out, in·k·k)
    sigma = spectral_norms(w, layer.u.view(members, -1), layer.spectral if layer.training else None)  # (P,)
    scale = torch.where(layer.spectral, sigma, torch.ones_like(sigma))  # 1 where it is off
    return (w / scale.view(-1, 1, 1)).view_as(layer.weight)


class PackedGenerator(nn.Module):
    """P generators (`harness.model.Generator`) as one."""

    def __init__(self, members: int, latent_dim: int) -> None:
        super().__init__()
        self.members = members
        self.fc = nn.Sequential(
            PackedLinear(members, latent_dim, 1024, bias=False),
            nn.BatchNorm1d(members * 1024),
            nn.ReLU(),
            PackedLinear(members, 1024, 128 * 7 * 7, bias=False),
            nn.BatchNorm1d(members * 128 * 7 * 7),
            nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(members * 128, members * 64, 4, stride=2, padding=1, bias=False, groups=members),
            nn.BatchNorm2d(members * 64),
            nn.ReLU(),
            nn.ConvTranspose2d(members * 64, members, 4, stride=2, padding=1, groups=members),
            nn.Sigmoid(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        members, batch, dim = latent.shape  # (P, B, latent_dim), member-major
        h = self.fc(latent.transpose(0, 1).reshape(batch, members * dim))  # (B, P·128·7·7)
        return self.deconv(h.view(batch, members * 128, 7, 7))  # (B, P, 28, 28) in [0, 1]: member p's in channel p


class PackedTrunk(nn.Module):
    """P trunks (`harness.model.Trunk`): (B, P, 28, 28) -> (B, P·1024)."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            PackedConv2d(members, 1, 64),
            nn.LeakyReLU(LEAK),
            PackedConv2d(members, 64, 128, bias=False),
            nn.BatchNorm2d(members * 128),
            nn.LeakyReLU(LEAK),
            nn.Flatten(),  # (B, P·128·7·7): member p's 6272 features in a block, as Trunk flattens them
            PackedLinear(members, 128 * 7 * 7, 1024, bias=False, spectral=True),
            nn.BatchNorm1d(members * 1024),
            nn.LeakyReLU(LEAK),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class PackedQHead(nn.Module):
    """P Q heads (`harness.model.QHead`): (B, P·1024) -> (P, B, q_dim)."""

    def __init__(self, members: int, out_dim: int) -> None:
        super().__init__()
        self.members, self.out_dim = members, out_dim
        self.layers = nn.Sequential(
            PackedLinear(members, 1024, 128, bias=False, spectral=True),
            nn.BatchNorm1d(members * 128),
            nn.LeakyReLU(LEAK),
            PackedLinear(members, 128, out_dim, bias=True, spectral=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.layers(features)  # (B, P·q_dim)
        return out.view(len(out), self.members, self.out_dim).transpose(0, 1)  # (P, B, q_dim), raw logits


class PackedInfoGAN(nn.Module):
    """P InfoGANs (`harness.model.InfoGAN`) of one latent layout; its state dict is theirs, concatenated."""

    def __init__(self, members: int, latent_dim: int, q_dim: int) -> None:
        super().__init__()
        self.members, self.latent_dim, self.q_dim = members, latent_dim, q_dim
        self.generator = PackedGenerator(members, latent_dim)
        self.trunk = PackedTrunk(members)
        self.d_head = PackedLinear(members, 1024, 1, bias=True, spectral=True)
        self.q_head = PackedQHead(members, q_dim)

    def set_spectral_norm(self, spectral_norm: Sequence[str]) -> None:
        """Each member's `model.spectral_norm`: none, d (D's layers: the trunk and D's head) or dq (and Q's)."""
        device = self.d_head.weight.device
        d_on = torch.tensor([sn != "none" for sn in spectral_norm], device=device)
        q_on = torch.tensor([sn == "dq" for sn in spectral_norm], device=device)
        for part, on in ((self.trunk, d_on), (self.d_head, d_on), (self.q_head, q_on)):
            for layer in part.modules():
                if isinstance(layer, PackedLinear | PackedConv2d):
                    layer.spectral = on if bool(on.any()) else None

    @classmethod
    def from_states(
        cls, states: Sequence[Mapping[str, torch.Tensor]], latent_dim: int, q_dim: int, device: torch.device
    ) -> PackedInfoGAN:
        """The pack of these members' InfoGAN state dicts, their weights and BatchNorm statistics exactly."""
        with torch.device("meta"):  # no initialisation: every tensor is loaded
            packed = cls(len(states), latent_dim, q_dim)
        packed = packed.to_empty(device=device)
        packed.load_state_dict(pack_states(states))
        return packed

    def select(self, keep: Sequence[int]) -> PackedInfoGAN:
        """A pack of the members `keep` (indices, in that order), with their state."""
        state = self.state_dict()
        states = [member_state(state, self.members, member) for member in keep]
        return PackedInfoGAN.from_states(states, self.latent_dim, self.q_dim, self.d_head.weight.device)

    def discriminate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, 28, 28), member p's images in channel p -> D's logits (P, B) and Q's outputs (P, B, q_dim)."""
        features = self.trunk(images)  # (B, P·1024)
        return self.d_head(features).t(), self.q_head(features)


def pack_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Members' state dicts -> one, each tensor concatenated along dim 0; a scalar (BatchNorm's batch count,
    which members stepping together share) is the first member's."""
    return {
        key: torch.cat([state[key] for state in states]) if value.dim() else value.clone()
        for key, value in states[0].items()
    }


def member_state(state: Mapping[str, torch.Tensor], members: int, member: int) -> dict[str, torch.Tensor]:
    """Member `member`'s InfoGAN state dict out of a pack's (views into it)."""
    return {key: value.unflatten(0, (members, -1))[member] if value.dim() else value for key, value in state.items()}
