"""Activation quantization for static int8 (QDQ) deployment: calibrated ranges, fake quantization while fine-tuning.

ONNX Runtime runs a static int8 model with integer kernels (``QLinearConv``, ``QGemm``)
when its activations carry ``QuantizeLinear``/``DequantizeLinear`` pairs: uint8 per tensor,
the scale and zero point from the tensor's range over calibration samples (min-max,
widened to include 0). In torch the same happens at the input of every convolution and
linear layer: an ``ActivationQuant`` module (a child of the layer, so its range is part of
the state dict and the artifact) rounds the input to that uint8 grid in the forward pass
and passes the gradient straight through (quantization-aware fine-tuning). The ranges are
taken once before fine-tuning and again after it, on the same calibration samples that the
export then hands to ONNX Runtime's own static quantization (``netshrink.deploy``), so the
two calibrate the same tensors on the same data.
"""

from __future__ import annotations

import torch
from torch import nn

from .inputs import Inputs, batch_size, call, take

LEVELS = 255  # uint8


class ActivationQuant(nn.Module):
    """Fake-quantizes a layer's input to uint8 over the calibrated range [low, high] (which includes 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.ones(()))
        self.enabled = True  # off while exporting the float graph that ONNX Runtime then quantizes itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        low, high = torch.clamp(self.low, max=0.0), torch.clamp(self.high, min=0.0)
        scale = torch.clamp((high - low) / LEVELS, min=1e-12)
        zero_point = torch.round(-low / scale)
        quantized = (torch.clamp(torch.round(x / scale) + zero_point, 0, LEVELS) - zero_point) * scale
        return x + (quantized - x).detach()


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


def attach(model: nn.Module, layers: list[str]) -> None:
    """Give each named layer an ``input_quant`` and a forward pre-hook through it (again, on a model rebuilt from an artifact)."""
    for name in layers:
        layer = model.get_submodule(name)
        if not hasattr(layer, "input_quant"):
            layer.input_quant = ActivationQuant()
            layer.register_forward_pre_hook(_quantize_input)


def quantized_layers(model: nn.Module) -> dict[str, ActivationQuant]:
    return {name.removesuffix(".input_quant"): module for name, module in model.named_modules() if isinstance(module, ActivationQuant)}


@torch.no_grad()
def calibrate(model: nn.Module, inputs: Inputs, batch: int = 64) -> None:
    """Set every ``ActivationQuant``'s range to the min and max of its layer's input over ``inputs``."""
    quants = quantized_layers(model)
    seen: dict[str, tuple[float, float]] = {}

    def observe(name: str):
        def hook(_module, args):
            x = args[0]
            low, high = seen.get(name, (float("inf"), float("-inf")))
            seen[name] = (min(low, float(x.min())), max(high, float(x.max())))

        return hook

    for quant in quants.values():
        quant.enabled = False
    handles = [model.get_submodule(name).register_forward_pre_hook(observe(name), prepend=True) for name in quants]
    training = model.training
    model.eval()
    try:
        for start in range(0, batch_size(inputs), batch):
            call(model, take(inputs, start, start + batch))
    finally:
        for handle in handles:
            handle.remove()
        for quant in quants.values():
            quant.enabled = True
        model.train(training)
    for name, quant in quants.items():
        low, high = seen.get(name, (0.0, 1.0))
        quant.low.fill_(min(low, 0.0))
        quant.high.fill_(max(high, 0.0))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for quant in quantized_layers(model).values():
        quant.enabled = enabled
