"""ResNet-20 for CIFAR-10 (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv 1512.03385, Section 4.2).

A 3x3 convolution with ``width`` filters, then 3 stages of 3 basic blocks (two 3x3 conv-BN layers,
ReLU) with ``width``, ``2*width``, ``4*width`` filters (16/32/64 by default); the first block of
stages 2 and 3 halves the feature map with stride 2. Then global average pooling and a Linear layer.
Shortcuts are identities; where the shape changes they use **option A** of the paper by default
(subsample by 2 and zero-pad the new channels: no parameters, which gives the paper's 0.27M
parameters), or ``shortcut="B"`` (1x1 convolution with stride 2 and BatchNorm, projection shortcuts).
Convolutions use He (Kaiming) normal initialisation (He et al., ICCV 2015), BatchNorm starts at
weight 1 and bias 0. Note BatchNorm's running statistics are buffers, not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, Problems, check_classes, check_shape, raise_problems

BLOCKS_PER_STAGE = 3  # 6n + 2 = 20 layers with n = 3
SHORTCUTS = ("A", "B")


@MODELS.add
@dataclass
class ResNet20Config:
    """``model=resnet20``: ResNet-20 (16/32/64 channels at width 16); inputs (C, H, W)."""

    name: str = "resnet20"
    width: int = 16  # channels of the first stage; stages have width, 2*width, 4*width
    shortcut: str = "A"  # "A": zero-padding identity (paper's CIFAR choice); "B": 1x1 conv projection
    zero_init_residual: bool = False  # start each block's last BN weight at 0 (Goyal et al. 2017)

    def problems(self) -> Problems:
        if self.width < 1:
            yield "width", self.width, "must be >= 1"
        if self.shortcut not in SHORTCUTS:
            yield "shortcut", self.shortcut, f"must be one of {list(SHORTCUTS)}"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        raise_problems("resnet20", self.problems())
        c, _, _ = check_shape("resnet20", input_shape, 3, "(C, H, W)")
        return ResNet20(
            c,
            check_classes("resnet20", num_classes),
            width=int(self.width),
            shortcut=str(self.shortcut),
            zero_init_residual=bool(self.zero_init_residual),
        )


class PadShortcut(nn.Module):
    """Option A: take every second pixel and append zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        shortcut: str = "A",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = [
                BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1, shortcut)
                for j in range(BLOCKS_PER_STAGE)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
