"""Models the search-quality benchmark runs on besides the built-in LeNet-5: ones netshrink's defaults were never
measured on. ``module:factory`` references, as a user's experiment file names its model.

- ``residual_cnn``: a small residual CNN for the 8x8 digits, with BatchNorm, two residual blocks and a channel
  concatenation of two branches (17,530 parameters, about 70 KB as float32), the kind of model issue 24 measured the default on.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResidualCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16)
        self.left = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.block2 = Block(24)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)  # the channel concat: pruning must keep both halves aligned
        x = self.block2(torch.nn.functional.max_pool2d(x, 2))
        return self.head(torch.flatten(self.pool(x), 1))


def residual_cnn(num_classes: int, input_shape) -> nn.Module:
    return ResidualCNN(num_classes=num_classes, in_channels=input_shape[0])
