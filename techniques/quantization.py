"""Weight quantization to 16 or 8 bits, trained with a straight-through estimator.

During fine-tuning the forward pass sees the rounded weights while gradients
flow to full-precision shadows (STE); after fine-tuning the weights are exactly
representable, and the artifact stores them as float16 or as int8 with one
float32 scale per output channel (symmetric, zero maps to zero so sparsity
survives). ``bits: 32`` is the identity.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from .base import CompressionContext, Stage, TechniqueConfig, compressible_weights
from .encoding import INT8_MAX, TensorEncoding, int8_scales


class QuantizationConfig(TechniqueConfig):
    kind: Literal["quantization"] = "quantization"
    bits: Literal[32, 16, 8] = Field(8, description="bit width of the stored weights; 32 leaves them as they are")

    def is_noop(self) -> bool:
        return self.bits == 32


class FakeQuantize(nn.Module):
    """Parametrization: forward uses quantized weights, backward passes gradients straight through."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_quantize(weight, self.bits) - weight).detach()


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The value the artifact will decode to for ``weight`` at ``bits``."""
    if bits == 16:
        return weight.to(torch.float16).to(weight.dtype)
    if bits == 8:
        scale = int8_scales(weight).reshape((-1,) + (1,) * (weight.dim() - 1))
        return torch.clamp(torch.round(weight / scale), -INT8_MAX, INT8_MAX) * scale
    return weight


class Quantization:
    kind: ClassVar[str] = "quantization"
    config_type: ClassVar[type[TechniqueConfig]] = QuantizationConfig
    stage: ClassVar[Stage] = Stage.QUANTIZATION
    default_space: ClassVar[dict[str, Any]] = {"bits": [16, 8]}

    def apply(self, model: nn.Module, config: QuantizationConfig, ctx: CompressionContext) -> None:
        for name, module in compressible_weights(model).items():
            parametrize.register_parametrization(module, "weight", FakeQuantize(config.bits))
            ctx.encodings[name] = ctx.encodings.get(name, TensorEncoding()).model_copy(update={"bits": config.bits})
