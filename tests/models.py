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


def tiny_vit() -> nn.Module:
    """netshrink's ViT at the contract tests' 12x12 inputs: 36 tokens, width 16, 2 blocks of 4 heads."""
    from netshrink.tasks.models import ViT

    return ViT(image_size=12, dim=16, depth=2, num_heads=4)


EDGE_MODELS = {
    "tiny_cnn": TinyCNN, "residual_bn": ResidualBN, "concat": Concat, "custom_layer": CustomLayer,
    "vit": tiny_vit, "torch_encoder": lambda: TorchEncoder(side=12),
}


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


class TorchEncoder(nn.Module):
    """Tokens through PyTorch's own ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), mean-pooled."""

    def __init__(self, num_classes: int = 10, width: int = 16, layers: int = 2, side: int = 8) -> None:
        super().__init__()
        self.side = side
        self.embed = nn.Linear(side, width)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True), layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], self.side, self.side))).mean(dim=1))


class SplitHeads(nn.Module):
    """Attention written by hand with separate q, k, v Linears, reshaped by its own ``heads`` attribute:
    no technique knows where its heads are."""

    def __init__(self, num_classes: int = 10, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, width)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        b, n, c = tokens.shape
        q, k, v = (layer(tokens).reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for layer in (self.q, self.k, self.v))
        mixed = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head(self.out(mixed).mean(dim=1))


class DictTokens(nn.Module):
    """A token-id model fed a dict (``input_ids``, ``attention_mask``) that returns a dict with ``logits``, as
    Hugging Face models do: embedding, a convolution over the sequence, a masked mean and a classifier."""

    def __init__(self, vocab: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, input_ids, attention_mask):
        hidden = torch.relu(self.conv(self.embed(input_ids).transpose(1, 2))).transpose(1, 2)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"logits": self.fc2(torch.relu(self.fc1(pooled)))}


class TwoInputs(nn.Module):
    """An image and a feature vector in, as ``model(image, features)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Linear(12, 16)
        self.fc1 = nn.Linear(8 + 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, image, features):
        x = torch.relu(self.bn(self.conv(image))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(torch.cat([x, torch.relu(self.side(features))], dim=1))))


def structured_batch(name: str, batch: int, seed: int = 0):
    """Model inputs of ``STRUCTURED_MODELS[name]`` for ``batch`` samples: real structures and dtypes (token ids stay integer)."""
    generator = torch.Generator().manual_seed(seed)
    if name == "dict_tokens":
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[:, 6:] = 0
        return {"input_ids": torch.randint(0, 20, (batch, 8), generator=generator), "attention_mask": mask}
    return (torch.randn(batch, 1, 12, 12, generator=generator), torch.randn(batch, 12, generator=generator))


STRUCTURED_MODELS = {"dict_tokens": DictTokens, "two_inputs": TwoInputs}
