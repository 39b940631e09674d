"""Built-in models."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """The Caffe LeNet-5 (20 and 50 conv filters, 500 hidden units): 431,080 parameters on 28x28 inputs.

    This is the network Deep Compression (Han et al., 2016) reports 39x on, so
    results here compare with the paper. As in Caffe's ``lenet_train_test``,
    there is no nonlinearity between the convolutions, only after ``fc1``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {image_size}x{image_size}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


class Attention(nn.Module):
    """Multi-head self-attention written as timm writes it: one ``qkv`` Linear split by ``num_heads``, one ``proj``.

    The forward pass reads ``num_heads`` and ``head_dim`` from the module, so a pruning that removes
    whole heads keeps it running by updating them (``netshrink.techniques.pruning``).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} must split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """A small vision transformer for 8x8 digits: 2x2 patches (16 tokens), pre-norm blocks, mean-pooled tokens.

    Patches are cut with a reshape and embedded by a Linear (no convolution), positions are learned,
    and the classifier reads the mean of the final tokens (no class token), so an early exit between
    blocks pools the tokens the same way.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, patch: int = 2, dim: int = 64, depth: int = 4,
        num_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"vit: image_size {image_size} must be a multiple of patch {patch}")
        self.patch = patch
        self.grid = image_size // patch
        self.patch_embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, int(dim * mlp_ratio), dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        batch, channels = x.shape[0], x.shape[1]
        patches = x.reshape(batch, channels, self.grid, self.patch, self.grid, self.patch).permute(0, 2, 4, 1, 3, 5)
        tokens = self.patch_embed(patches.reshape(batch, self.grid * self.grid, channels * self.patch * self.patch)) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, **kwargs) -> nn.Module:
    return ViT(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
