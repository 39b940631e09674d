"""A user model whose training outputs turn to NaN once its channels are pruned: fine-tuning such a trial meets a
NaN loss. In eval mode it stays finite, so the probe before the search (untrained model, eval-mode forward pass
and ONNX export) passes, and the failure comes where the test wants it: inside a trial."""

import torch
from torch import nn


class NanWhenPruned(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        logits = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return logits * float("nan") if self.training and self.conv.out_channels != 8 else logits


def make(num_classes):
    return NanWhenPruned(num_classes)
