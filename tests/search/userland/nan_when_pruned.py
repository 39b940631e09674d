"""A user model whose outputs turn to NaN once its channels are pruned: fine-tuning such a trial meets a NaN loss."""

import torch
from torch import nn


class NanWhenPruned(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        logits = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return logits if self.conv.out_channels == 8 else logits * float("nan")


def make(num_classes):
    return NanWhenPruned(num_classes)
