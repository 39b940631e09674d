"""Magnitude pruning, unstructured (weights) or structured (channels).

Deciding (importance scores), removing (masks or physical removal) and
measuring are separate steps, as in Torch-Pruning.

- ``weight``: the smallest-magnitude weights of each layer are zeroed and held
  at zero during fine-tuning; the artifact stores the layer sparse (bitmask +
  nonzeros), so bytes are saved, but the dense runtime is not faster.
- ``channel``: whole output channels/neurons with the smallest L1 (or L2) norm
  are physically removed with Torch-Pruning, which keeps coupled layers
  (residual adds, BatchNorm, concatenations) consistent, so the model really
  shrinks and runs faster; the output layer keeps all its classes.

With ``steps`` > 1 the ratio is reached gradually (Han et al., 2015: iterative
pruning and retraining), fine-tuning between steps.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from .base import CompressionContext, Stage, TechniqueConfig, compressible_weights
from .early_exit import all_outputs
from .encoding import TensorEncoding


class PruningConfig(TechniqueConfig):
    kind: Literal["pruning"] = "pruning"
    granularity: Literal["weight", "channel"] = Field(
        "channel", description="weight: unstructured, stored sparse; channel: structured, channels removed"
    )
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of weights (or of channels per layer) removed")
    steps: int = Field(1, ge=1, le=10, description="prune in this many steps, fine-tuning between them")
    importance: Literal["l1", "l2"] = Field(
        "l1", description="channel norm that ranks channels (for single weights both rank alike)"
    )


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


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Cumulative ratios after each step; every step removes the same fraction of what is left."""
    return [1.0 - (1.0 - ratio) ** ((step + 1) / steps) for step in range(steps)]


def _between_steps(model: nn.Module, step: int, steps: int, ctx: CompressionContext) -> None:
    if step < steps - 1 and ctx.fine_tune is not None:
        ctx.fine_tune(model, ctx.loss_fn)


def prune_weights(model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
    layers = compressible_weights(model)
    for step, ratio in enumerate(step_ratios(config.ratio, config.steps)):
        for name, module in layers.items():
            if parametrize.is_parametrized(module, "weight"):
                # Pruned weights read as exactly zero, so they stay among the smallest and stay pruned.
                module.parametrizations.weight[0].mask.copy_(magnitude_mask(module.weight, ratio))
            else:
                parametrize.register_parametrization(module, "weight", WeightMask(magnitude_mask(module.weight, ratio)))
                ctx.encodings[name] = ctx.encodings.get(name, TensorEncoding()).model_copy(update={"sparse": True})
        _between_steps(model, step, config.steps, ctx)


def prune_channels(model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
    protected = [module for name, module in model.named_modules() if name in ctx.protected_modules]
    pruner = tp.pruner.BasePruner(
        model,
        ctx.example_inputs,
        importance=tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2),
        pruning_ratio=config.ratio,
        iterative_steps=config.steps,
        ignored_layers=protected,
        forward_fn=all_outputs,  # every exit of an early-exit model, so its heads are pruned consistently
    )
    for step in range(config.steps):
        pruner.step()
        _between_steps(model, step, config.steps, ctx)


class Pruning:
    kind: ClassVar[str] = "pruning"
    config_type: ClassVar[type[TechniqueConfig]] = PruningConfig
    stage: ClassVar[Stage] = Stage.PRUNING
    default_space: ClassVar[dict[str, Any]] = {
        "granularity": ["weight", "channel"],
        "ratio": {"low": 0.2, "high": 0.9},
        "steps": {"low": 1, "high": 3},
        "importance": ["l1", "l2"],
    }
    # knobs that only mean something for some values of an earlier knob: asked only then
    conditions: ClassVar[dict[str, dict[str, Any]]] = {"importance": {"granularity": "channel"}}

    def reshapes(self, config: PruningConfig) -> bool:
        """Channel pruning removes channels: the stored layers are narrower than the model's factory builds them."""
        return config.granularity == "channel"

    def apply(self, model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
        if config.granularity == "weight":
            prune_weights(model, config, ctx)
        else:
            prune_channels(model, config, ctx)
