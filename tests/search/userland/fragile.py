"""A user model that breaks in training once its channels are pruned: every trial of a channel-pruning search fails.

In training only, so that validation, which probes the space on the model in eval mode, cannot see it
coming: a fault that shows only mid-trial, as a user's code can have."""

import torch
from torch import nn


class Fragile(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if self.training and self.conv.out_channels != 8:
            raise RuntimeError("Fragile refuses to run with pruned channels")
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make(num_classes):
    return Fragile(num_classes)
