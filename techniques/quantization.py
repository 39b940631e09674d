"""Weight quantization to 16, 8, 4, 2 or 1 bits, trained with a straight-through estimator.

During fine-tuning the forward pass sees the quantized weights while gradients
flow to full-precision shadows (STE); after fine-tuning the weights are exactly
representable, and the artifact stores them as float16, or as integer codes
with one scale per output channel (on the float16 grid, stored at 2 bytes): 8/4/2 bits on the symmetric grid
[-(2^(b-1)-1), 2^(b-1)-1] (zero maps to zero, so sparsity survives; 2 bits is
ternary), 1 bit as sign(w) * mean|w| (binary weights, XNOR-Net). Sub-byte codes
are stored packed. The biases of the quantized layers train and are stored on
the float16 grid too. ``bits: 32`` is the identity.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from .base import (
    PER_LAYER, CompressionContext, Stage, Technique, TechniqueConfig, attribute_of, compressible_weights, per_layer, round_bias_to_half,
)
from . import activations
from .slimmable import find_slimmable
from .allocation import allocated_widths
from .encoding import INTEGER_BITS, Bits, TensorEncoding, channel_scales, dequantize, quantize_codes


class QuantizationConfig(TechniqueConfig):
    VERSION: ClassVar[int] = 2  # 2: scales and the compressed layers' biases on the float16 grid
    kind: Literal["quantization"] = "quantization"
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="uniform: every layer at `bits`; sensitivity: per-layer widths (8/4/2/1) averaging `average_bits`"
    )
    bits: Bits = Field(8, description="bit width of the stored weights; 32 leaves them as they are")
    average_bits: float = Field(4.0, ge=1.0, le=8.0, description="allocation sensitivity: the average width over the stored weights")
    layer_bits: dict[str, Bits] | None = Field(
        None,
        json_schema_extra=PER_LAYER,
        description="layer (module name) -> its own bit width; layers not listed get `bits`. Written by allocation sensitivity",
    )
    activations: Literal["float", "int8"] = Field(
        "float",
        description="int8: activations quantized too (uint8 per tensor, calibrated, fake-quantized while fine-tuning) and the model "
        "exported as static int8 QDQ, which ONNX Runtime runs with integer kernels; needs bits 8 (uniform)",
    )

    @model_validator(mode="after")
    def _int8_activations_need_int8_weights(self) -> "QuantizationConfig":
        if self.activations == "int8" and (self.allocation != "uniform" or self.bits != 8 or any(b != 8 for b in (self.layer_bits or {}).values())):
            raise ValueError("quantization.activations int8 needs int8 weights: allocation uniform and bits 8 (static int8 is int8 throughout)")
        return self

    def is_noop(self) -> bool:
        return (
            self.allocation == "uniform" and self.bits == 32 and self.activations == "float"
            and all(bits == 32 for bits in (self.layer_bits or {}).values())
        )


class FakeQuantize(nn.Module):
    """Parametrization: forward uses quantized weights, backward passes gradients straight through.

    The gradient is passed unchanged at every width, 1 bit included: BinaryConnect
    zeroes it where |w| > 1 because it clips its weights to [-1, 1], but with a
    per-channel scale the shadow weights are not clipped and typical weights sit far
    below 1, so that cancellation would almost never act; one rule keeps one path.
    """

    def __init__(self, bits: int, sparse: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.sparse = sparse

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_quantize(weight, self.bits, self.sparse) - weight).detach()


def fake_quantize(weight: torch.Tensor, bits: int, sparse: bool = False) -> torch.Tensor:
    """The value the artifact will decode to for ``weight`` at ``bits`` (``sparse``: stored with a bitmask)."""
    if bits == 16:
        return weight.to(torch.float16).to(weight.dtype)
    if bits in INTEGER_BITS:
        scale = channel_scales(weight, bits, sparse)
        return dequantize(quantize_codes(weight, scale, bits, sparse), scale).to(weight.dtype)
    return weight


class Quantization(Technique):
    summary = 'quantization of the weights to 16, 8, 4, 2 or 1 bits (binary with a straight-through estimator), optionally static int8 activations'
    config_type: ClassVar[type[TechniqueConfig]] = QuantizationConfig
    stage: ClassVar[Stage] = Stage.QUANTIZATION
    default_space: ClassVar[dict[str, Any]] = {"allocation": ["uniform", "sensitivity"], "bits": [16, 8, 4, 2, 1], "average_bits": {"low": 1.0, "high": 6.0}}
    conditions: ClassVar[dict[str, dict[str, Any]]] = {
        "bits": {"allocation": "uniform"},
        "average_bits": {"allocation": "sensitivity"},
        "activations": {"allocation": "uniform", "bits": 8},
    }

    def resolve(self, model: nn.Module, config: QuantizationConfig, ctx: CompressionContext) -> QuantizationConfig:
        """allocation sensitivity: the per-layer widths, written into ``layer_bits`` (a given ``layer_bits`` is kept).
        int8 activations on a model with early exits stay float (its exits are ``If`` branches, which ONNX Runtime's
        static quantization does not reach), with a note and the recipe saying so."""
        if config.activations == "int8" and hasattr(model, "all_outputs"):
            ctx.notes.append("quantization: activations left float: static int8 export does not reach an early-exit model's exit branches")
            return config.model_copy(update={"activations": "float"})
        if config.activations == "int8" and find_slimmable(model) is not None:
            ctx.notes.append("quantization: activations left float: static int8 is calibrated per graph, and a slimmable network's widths share one weight file")
            return config.model_copy(update={"activations": "float"})
        if config.allocation == "uniform" or config.layer_bits is not None:
            return config
        return config.model_copy(update={"layer_bits": allocated_widths(model, "quantization", config.average_bits, ctx)})

    def apply(self, model: nn.Module, config: QuantizationConfig, ctx: CompressionContext) -> None:
        layers = compressible_weights(model)
        for name, bits in per_layer(layers, config.layer_bits, config.bits, "quantization.layer_bits").items():
            if bits == 32:
                continue
            encoding = ctx.encodings.get(name, TensorEncoding()).model_copy(update={"bits": bits})
            parametrize.register_parametrization(layers[name], attribute_of(name), FakeQuantize(bits, encoding.sparse))
            round_bias_to_half(layers[name], name)
            ctx.encodings[name] = encoding
        if config.activations == "int8":
            activations.attach(model, activation_layers(model))
            activations.calibrate(model, ctx.calibration_inputs if ctx.calibration_inputs is not None else ctx.example_inputs)

    def finish(self, model: nn.Module, config: QuantizationConfig, ctx: CompressionContext) -> None:
        """After fine-tuning: the activation ranges again, on the weights the model ends with (ONNX Runtime calibrates those)."""
        if config.activations == "int8":
            activations.calibrate(model, ctx.calibration_inputs if ctx.calibration_inputs is not None else ctx.example_inputs)

    def rebuild(self, model: nn.Module, config: QuantizationConfig) -> None:
        """int8 activations: the layers get their ``input_quant`` again (its stored range is then loaded into it)."""
        if config.activations == "int8":
            activations.attach(model, activation_layers(model))


def activation_layers(model: nn.Module) -> list[str]:
    """The layers whose inputs static int8 quantizes: every convolution and linear layer (ONNX Runtime's QLinearConv, QGemm)."""
    return [name for name, module in model.named_modules() if name and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))]
