"""Magnitude pruning, unstructured (weights) or structured (channels).

Deciding (importance scores), removing (masks or physical removal) and
measuring are separate steps, as in Torch-Pruning.

- ``weight``: the smallest-magnitude weights of each layer are zeroed and held
  at zero during fine-tuning; the artifact stores the layer sparse (bitmask +
  nonzeros), so bytes are saved, but the dense runtime is not faster.
- ``channel``: whole output channels/neurons with the smallest L1 norm are
  physically removed with Torch-Pruning, so the model really shrinks and runs
  faster; the output layer keeps all its classes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from .base import CompressionContext, Stage, TechniqueConfig, compressible_weights
from .encoding import TensorEncoding


class PruningConfig(TechniqueConfig):
    kind: Literal["pruning"] = "pruning"
    granularity: Literal["weight", "channel"] = Field(
        "channel", description="weight: unstructured, stored sparse; channel: structured, channels removed"
    )
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of weights (or of channels per layer) removed")


class WeightMask(nn.Module):
    """Parametrization that keeps pruned weights at exactly zero while the rest train."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask that drops the ``ratio`` smallest-|w| entries (ties broken by position, deterministically)."""
    flat = weight.detach().abs().reshape(-1)
    drop = int(round(ratio * flat.numel()))
    mask = torch.ones_like(flat)
    if drop > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:drop]] = 0.0
    return mask.reshape(weight.shape)


def prune_weights(model: nn.Module, ratio: float, ctx: CompressionContext) -> None:
    for name, module in compressible_weights(model).items():
        mask = magnitude_mask(module.weight, ratio)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
        ctx.encodings[name] = ctx.encodings.get(name, TensorEncoding()).model_copy(update={"sparse": True})


def prune_channels(model: nn.Module, ratio: float, ctx: CompressionContext) -> None:
    protected = [module for name, module in model.named_modules() if name in ctx.protected_modules]
    pruner = tp.pruner.BasePruner(
        model,
        ctx.example_inputs,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=protected,
    )
    pruner.step()


class Pruning:
    kind: ClassVar[str] = "pruning"
    config_type: ClassVar[type[TechniqueConfig]] = PruningConfig
    stage: ClassVar[Stage] = Stage.PRUNING
    default_space: ClassVar[dict[str, Any]] = {
        "granularity": ["weight", "channel"],
        "ratio": {"low": 0.2, "high": 0.9},
    }

    def apply(self, model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
        if config.granularity == "weight":
            prune_weights(model, config.ratio, ctx)
        else:
            prune_channels(model, config.ratio, ctx)
