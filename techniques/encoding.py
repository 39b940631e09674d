"""How one tensor is stored in the compressed artifact.

The storage plan is explicit so that the bytes a technique promises can be
checked against the bytes the artifact writer produces (see ``payload_bytes``).

Integer widths (8, 4, 2, 1 bits) store one code per weight plus one float32
scale per output channel; the decoded weight is ``code * scale``. 8-bit codes
are int8; 4-, 2- and 1-bit codes are packed into uint8 bytes (first code in the
high bits, the last byte zero-padded), so the artifact shrinks by the bit ratio.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

Bits = Literal[32, 16, 8, 4, 2, 1]

INTEGER_BITS = (8, 4, 2, 1)  # stored as codes + per-output-channel float32 scales
PACKED_BITS = (4, 2, 1)  # codes packed 8 // bits to a byte


class TensorEncoding(BaseModel):
    """Storage of one tensor: dense or sparse (bitmask + nonzeros), and bit width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparse: bool = False
    bits: Bits = 32

    def payload_bytes(self, shape: tuple[int, ...], nonzeros: int) -> int:
        """Bytes this encoding writes for a float tensor of ``shape`` with ``nonzeros`` nonzero values."""
        numel = math.prod(shape)
        stored = nonzeros if self.sparse else numel
        size = math.ceil(stored * self.bits / 8)
        if self.sparse:
            size += math.ceil(numel / 8)
        if self.bits in INTEGER_BITS:
            size += 4 * _out_channels(shape)
        return size


def _out_channels(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def level_max(bits: int) -> int:
    """Largest code of the symmetric grid [-q, q]: 127 at 8 bits, 7 at 4, 1 at 2 (ternary) and 1 (binary)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def channel_scales(weight: torch.Tensor, bits: int, sparse: bool = False) -> torch.Tensor:
    """Per-output-channel float32 scale of the ``bits``-wide grid.

    8/4/2 bits: max|w| / level_max, so the largest weight is exact (a zero channel
    gets scale 1). 1 bit: mean|w| over the channel, the L2-optimal scale of
    sign(w) (XNOR-Net, Rastegari et al. 2016); when the tensor is stored sparse the
    mean runs over the nonzeros only, since zeros are kept by the bitmask.
    """
    flat = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 0 else weight.detach().reshape(1, 1)
    flat = flat.to(torch.float32)
    if bits == 1:
        count = (flat != 0).sum(dim=1) if sparse else torch.full((flat.shape[0],), flat.shape[1])
        return flat.abs().sum(dim=1) / count.clamp(min=1)
    scale = flat.abs().amax(dim=1) / level_max(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, sparse: bool = False) -> torch.Tensor:
    """int8 codes in [-level_max, level_max] of ``weight`` on the grid ``scale``.

    1 bit: the sign, with sign(0) = +1 because a dense binary code has no zero;
    sparse tensors keep their zeros (the bitmask stores them), so there zero maps to 0.
    """
    weight = weight.detach().to(torch.float32)
    if bits == 1:
        codes = torch.where(weight >= 0, 1, -1)
        if sparse:
            codes = torch.where(weight == 0, 0, codes)
        return codes.to(torch.int8)
    view = (-1,) + (1,) * (weight.dim() - 1)
    q = level_max(bits)
    return torch.clamp(torch.round(weight / scale.reshape(view)), -q, q).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    view = (-1,) + (1,) * (codes.dim() - 1)
    return codes.to(torch.float32) * scale.reshape(view)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes ``8 // bits`` to a uint8 byte as unsigned offsets (1 bit: the sign bit)."""
    flat = codes.reshape(-1).numpy().astype(np.int16)
    unsigned = (flat > 0) if bits == 1 else flat + level_max(bits)
    per_byte = 8 // bits
    padded = np.zeros(math.ceil(flat.size / per_byte) * per_byte, dtype=np.uint8)
    padded[: flat.size] = unsigned
    groups = padded.reshape(-1, per_byte)
    packed = np.bitwise_or.reduce(groups << _shifts(bits), axis=1)
    return torch.from_numpy(np.ascontiguousarray(packed))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes, as int8."""
    unsigned = ((packed.numpy()[:, None] >> _shifts(bits)) & ((1 << bits) - 1)).reshape(-1)[:count].astype(np.int8)
    codes = 2 * unsigned - 1 if bits == 1 else unsigned - level_max(bits)
    return torch.from_numpy(codes.astype(np.int8))


def _shifts(bits: int) -> np.ndarray:
    return np.arange(8 - bits, -1, -bits, dtype=np.uint8)


def encode_tensor(name: str, tensor: torch.Tensor, encoding: TensorEncoding) -> dict[str, torch.Tensor]:
    """Tensors (keyed ``name`` + suffix) that store ``tensor`` under ``encoding``."""
    tensor = tensor.detach().cpu().contiguous()
    if not tensor.is_floating_point():
        return {name: tensor}
    out: dict[str, torch.Tensor] = {}
    if encoding.bits in INTEGER_BITS:
        scale = channel_scales(tensor, encoding.bits, encoding.sparse)
        values = quantize_codes(tensor, scale, encoding.bits, encoding.sparse)
        out[f"{name}.scale"] = scale
    elif encoding.bits == 16:
        values = tensor.to(torch.float16)
    else:
        values = tensor.to(torch.float32)
    if encoding.sparse:
        mask = tensor != 0
        packed = np.packbits(mask.reshape(-1).numpy())
        out[f"{name}.mask"] = torch.from_numpy(packed)
        values = values.reshape(-1)[mask.reshape(-1)]
    if encoding.bits in PACKED_BITS:
        values = pack_codes(values, encoding.bits)
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
    mask = None
    if encoding.sparse:
        mask = torch.from_numpy(np.unpackbits(stored[f"{name}.mask"].numpy(), count=numel).astype(bool))
    if encoding.bits in PACKED_BITS:
        values = unpack_codes(values, encoding.bits, int(mask.sum()) if mask is not None else numel)
    if mask is not None:
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        values = dense
    values = values.reshape(shape)
    if encoding.bits in INTEGER_BITS:
        return dequantize(values, stored[f"{name}.scale"])
    return values.to(torch.float32)
