"""A user model that breaks once its channels are pruned: every trial of a channel-pruning search fails."""

import torch
from torch import nn


class Fragile(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if self.conv.out_channels != 8:
            raise RuntimeError("Fragile refuses to run with pruned channels")
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make(num_classes):
    return Fragile(num_classes)
