"""Image encoders of the pose network: particle image ``(n, 1, N, N)`` → feature map
``(n, C, M, M)`` that the hemisphere projection reads.

* ``"quarter_turn"`` (the poster's, :class:`cryosphere.poses.network.layers.QuarterTurnConv2d`): two
  stride-2 convolutions with kernels invariant under 90° turns; exactly equivariant to quarter
  turns of the image, but blind to oriented edges, with a receptive field of ~9 px.
* ``"resnet"`` (:class:`ResidualEncoder`): a 5×5 stride-2 stem, then one stage per entry of
  ``channels``, each a stride-2 residual block (two 3×3 convolutions, GroupNorm, ReLU, a 1×1
  stride-2 shortcut) followed by ``blocks_per_stage − 1`` stride-1 blocks. With channels
  ``(16, 32, 64)`` a 64-px image becomes an 8×8 map whose receptive field (~75 px) covers the
  whole box. Ordinary convolutions, so in-plane equivariance is learned from data (streamed
  training draws every in-plane angle). GroupNorm, not BatchNorm: the output of an image never
  depends on the other images of its batch, so training is the same on one process or
  sharded over several.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ENCODERS", "ResidualBlock", "ResidualEncoder", "resnet_feature_size"]

ENCODERS = ("quarter_turn", "resnet")


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ResidualBlock(nn.Module):
    """``relu(x' + conv(relu(norm(conv(x)))))`` with ``x'`` the (strided 1×1) shortcut.

    Input ``(n, C_in, H, W)``, output ``(n, C_out, ceil(H/s), ceil(W/s))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.GroupNorm(_groups(out_channels), out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
                conv.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            for norm in (self.norm1, self.norm2):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
            self.norm2.weight.fill_(0.5)  # residual branch starts small
            if isinstance(self.shortcut, nn.Sequential):
                conv, norm = self.shortcut[0], self.shortcut[1]
                conv.weight.normal_(0.0, math.sqrt(1.0 / conv.weight.shape[1]), generator=generator)
                norm.weight.fill_(1.0)
                norm.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


def resnet_feature_size(image_size: int, n_stages: int) -> int:
    """Side ``M`` of the encoder output: the stem and every stage halve (rounding up)."""
    size = int(image_size)
    for _ in range(int(n_stages) + 1):
        size = (size + 1) // 2
    return size


def default_encoder_channels(image_size: int) -> tuple[int, ...]:
    """Channels ``16, 32, 64, …`` of as many stages as bring an ``image_size``-px input down to
    a feature map of at most 4 px (:func:`resnet_feature_size`): (16, 32, 64) at 64 px, (16,
    32) at 32 px, (16, 32, 64, 128) at 128 px. At 32 px three stages leave a 2-px map, and
    the network learns far more slowly (docs/benchmarks_search.md, "A network at 32 px")."""
    stages = 1
    while resnet_feature_size(image_size, stages) > 4:
        stages += 1
    return tuple(16 * 2**i for i in range(stages))


class ResidualEncoder(nn.Module):
    """Stem (5×5, stride 2, ``channels[0]``) + one residual stage per entry of ``channels``.

    Input ``(n, 1, N, N)`` (normalised images), output ``(n, channels[-1], M, M)`` with
    ``M = resnet_feature_size(N, len(channels))``.
    """

    def __init__(self, channels: tuple[int, ...], blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(1, channels[0], 5, 2, padding=2, bias=False)
        self.stem_norm = nn.GroupNorm(_groups(channels[0]), channels[0])
        blocks = []
        in_ch = channels[0]
        for out_ch in channels:
            blocks.append(ResidualBlock(in_ch, out_ch, stride=2))
            blocks.extend(ResidualBlock(out_ch, out_ch) for _ in range(blocks_per_stage - 1))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = int(channels[-1])

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.stem.weight.normal_(0.0, math.sqrt(2.0 / 25.0), generator=generator)
            self.stem_norm.weight.fill_(1.0)
            self.stem_norm.bias.zero_()
        for block in self.blocks:
            block.reset_parameters(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.relu(self.stem_norm(self.stem(x))))
