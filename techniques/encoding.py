"""How one tensor is stored in the compressed artifact.

The storage plan is explicit so that the bytes a technique promises can be
checked against the bytes the artifact writer produces (see ``payload_bytes``).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

Bits = Literal[32, 16, 8]

INT8_MAX = 127  # symmetric range [-127, 127]: zero maps to zero, so pruned weights stay pruned


class TensorEncoding(BaseModel):
    """Storage of one tensor: dense or sparse (bitmask + nonzeros), and bit width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparse: bool = False
    bits: Bits = 32

    def payload_bytes(self, shape: tuple[int, ...], nonzeros: int) -> int:
        """Bytes this encoding writes for a float tensor of ``shape`` with ``nonzeros`` nonzero values."""
        numel = math.prod(shape)
        stored = nonzeros if self.sparse else numel
        size = stored * self.bits // 8
        if self.sparse:
            size += math.ceil(numel / 8)
        if self.bits == 8:
            size += 4 * _out_channels(shape)
        return size


def _out_channels(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale, max|w| / 127 (a zero channel gets scale 1)."""
    flat = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 0 else weight.reshape(1, 1)
    scale = flat.abs().amax(dim=1) / INT8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)


def quantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    view = (-1,) + (1,) * (weight.dim() - 1)
    return torch.clamp(torch.round(weight / scale.reshape(view)), -INT8_MAX, INT8_MAX).to(torch.int8)


def encode_tensor(name: str, tensor: torch.Tensor, encoding: TensorEncoding) -> dict[str, torch.Tensor]:
    """Tensors (keyed ``name`` + suffix) that store ``tensor`` under ``encoding``."""
    tensor = tensor.detach().cpu().contiguous()
    if not tensor.is_floating_point():
        return {name: tensor}
    out: dict[str, torch.Tensor] = {}
    if encoding.bits == 8:
        scale = int8_scales(tensor)
        values = quantize_int8(tensor, scale)
        out[f"{name}.scale"] = scale
    elif encoding.bits == 16:
        values = tensor.to(torch.float16)
    else:
        values = tensor.to(torch.float32)
    if encoding.sparse:
        mask = tensor != 0
        packed = np.packbits(mask.reshape(-1).numpy())
        out[f"{name}.mask"] = torch.from_numpy(packed)
        out[f"{name}.values"] = values.reshape(-1)[mask.reshape(-1)].contiguous()
    else:
        out[f"{name}.values"] = values.contiguous()
    return out


def decode_tensor(
    name: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...], encoding: TensorEncoding
) -> torch.Tensor:
    """Inverse of ``encode_tensor``: the float32 (or original integer) tensor."""
    if name in stored:
        return stored[name]
    values = stored[f"{name}.values"]
    numel = math.prod(shape)
    if encoding.sparse:
        mask_bits = np.unpackbits(stored[f"{name}.mask"].numpy(), count=numel).astype(bool)
        mask = torch.from_numpy(mask_bits)
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        values = dense
    values = values.reshape(shape)
    if encoding.bits == 8:
        scale = stored[f"{name}.scale"]
        view = (-1,) + (1,) * (len(shape) - 1)
        return values.to(torch.float32) * scale.reshape(view)
    return values.to(torch.float32)
