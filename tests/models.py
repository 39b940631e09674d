"""Tiny edge-case models for technique tests: they catch graph assumptions early."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResidualBN(nn.Module):
    """Residual add and BatchNorm: channel pruning must keep both branches consistent."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class Concat(nn.Module):
    """Two branches concatenated along channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 6, 3, padding=1)
        self.right = nn.Conv2d(1, 10, 5, padding=2)
        self.mix = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.head(torch.relu(self.mix(x)).mean(dim=(2, 3)))


class Scale(nn.Module):
    """A custom layer with its own parameter, unknown to any pruning library."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gain


class CustomLayer(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = Scale(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.scale(torch.relu(self.conv(x))).mean(dim=(2, 3)))


EDGE_MODELS = {"tiny_cnn": TinyCNN, "residual_bn": ResidualBN, "concat": Concat, "custom_layer": CustomLayer}


def applied_agrees_with_sampled(applied: dict, sampled: dict) -> bool:
    """A trial's ``recipe.json`` (the pipeline as applied) against its ``recipe`` tag (as sampled): the same
    steps with the same knobs; what the sampled recipe left open (None, an empty placement) the applied
    one may have filled in (layers and ranks chosen, widths allocated, the cut point resolved)."""
    if [step["kind"] for step in applied["steps"]] != [step["kind"] for step in sampled["steps"]]:
        return False
    return all(
        done[key] == value
        for done, asked in zip(applied["steps"], sampled["steps"])
        for key, value in asked.items()
        if value not in (None, [], ())
    )
