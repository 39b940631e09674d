"""How one tensor is stored in the compressed artifact.

The storage plan is explicit so that the bytes a technique promises can be
checked against the bytes the artifact writer produces (see ``payload_bytes``).

Integer widths (8, 4, 2, 1 bits) store one code per weight plus one float32
scale per output channel; the decoded weight is ``code * scale``. 8-bit codes
are int8; 4-, 2- and 1-bit codes are packed into uint8 bytes (first code in the
high bits, the last byte zero-padded), so the artifact shrinks by the bit ratio.

Clustered tensors (weight sharing) store their distinct values as float32
centroids and, per stored weight, a cluster index: packed at ceil(log2 k) bits,
or as a canonical Huffman bitstream plus one code length per centroid. The
indices are derived from the tensor itself: every value equals one centroid.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import huffman

Bits = Literal[32, 16, 8, 4, 2, 1]

INTEGER_BITS = (8, 4, 2, 1)  # stored as codes + per-output-channel float32 scales
PACKED_BITS = (4, 2, 1)  # codes packed 8 // bits to a byte


class TensorEncoding(BaseModel):
    """Storage of one tensor: dense or sparse (bitmask + nonzeros), and bit width or clusters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparse: bool = False
    bits: Bits = 32
    clusters: int | None = Field(None, ge=2, le=256, description="stored as indices into this many centroids")
    huffman: bool = False

    @model_validator(mode="after")
    def _one_value_format(self) -> "TensorEncoding":
        if self.clusters is not None and self.bits != 32:
            raise ValueError(f"clusters={self.clusters} with bits={self.bits}: a tensor is stored either clustered or at reduced bits")
        if self.huffman and self.clusters is None:
            raise ValueError("huffman=True needs clusters: only cluster indices are Huffman-coded")
        return self

    def payload_bytes(self, tensor: torch.Tensor) -> int:
        """Bytes this encoding writes for the float ``tensor``, computed without serialising it."""
        shape = tuple(tensor.shape)
        numel = math.prod(shape)
        mask = math.ceil(numel / 8) if self.sparse else 0
        if self.clusters is not None:
            centroids, indices = cluster_indices(tensor, self)
            size = 4 * centroids.numel() + mask
            if self.huffman:  # the code-length table, and each symbol's frequency x its code length in bits
                frequencies = np.bincount(indices, minlength=centroids.numel())
                lengths = huffman.code_lengths(frequencies)
                return size + lengths.size + math.ceil(int((frequencies * lengths).sum()) / 8)
            return size + math.ceil(indices.size * index_width(self.clusters) / 8)
        stored = int((tensor != 0).sum()) if self.sparse else numel
        size = math.ceil(stored * self.bits / 8) + mask
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
    return pack_bits(((flat > 0) if bits == 1 else flat + level_max(bits)).astype(np.uint8), bits)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes, as int8."""
    unsigned = unpack_bits(packed, bits, count)
    codes = 2 * unsigned - 1 if bits == 1 else unsigned - level_max(bits)
    return torch.from_numpy(codes.astype(np.int8))


def index_width(clusters: int) -> int:
    """Bits of a fixed-width index into ``clusters`` centroids: ceil(log2 k)."""
    return max(1, math.ceil(math.log2(clusters)))


def pack_bits(values: np.ndarray, width: int) -> torch.Tensor:
    """Pack unsigned integers below ``2**width`` (width 1..8) into uint8, first value in the high bits, last byte zero-padded."""
    values = np.asarray(values, dtype=np.uint8).reshape(-1)
    bits = (values[:, None] >> np.arange(width - 1, -1, -1, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` values, as int64."""
    bits = np.unpackbits(packed.numpy(), count=count * width).reshape(count, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def cluster_indices(tensor: torch.Tensor, encoding: TensorEncoding) -> tuple[torch.Tensor, np.ndarray]:
    """The centroids (the distinct stored values, ascending, float32) and each stored value's index into them.

    Stored values are the nonzeros when the tensor is sparse (the bitmask keeps the zeros), else all values.
    """
    flat = tensor.detach().to(torch.float32).reshape(-1)
    if encoding.sparse:
        flat = flat[flat != 0]
    centroids, indices = torch.unique(flat, sorted=True, return_inverse=True)
    if centroids.numel() > encoding.clusters:
        raise ValueError(
            f"tensor has {centroids.numel()} distinct values but is planned as clusters={encoding.clusters}: "
            "a clustered tensor must hold only its centroids"
        )
    return centroids, indices.numpy().astype(np.int64)


def encode_tensor(name: str, tensor: torch.Tensor, encoding: TensorEncoding) -> dict[str, torch.Tensor]:
    """Tensors (keyed ``name`` + suffix) that store ``tensor`` under ``encoding``."""
    tensor = tensor.detach().cpu().contiguous()
    if not tensor.is_floating_point():
        return {name: tensor}
    out: dict[str, torch.Tensor] = {}
    if encoding.sparse:
        out[f"{name}.mask"] = torch.from_numpy(np.packbits((tensor != 0).reshape(-1).numpy()))
    if encoding.clusters is not None:
        return {**out, **_encode_clustered(name, tensor, encoding)}
    if encoding.bits in INTEGER_BITS:
        scale = channel_scales(tensor, encoding.bits, encoding.sparse)
        values = quantize_codes(tensor, scale, encoding.bits, encoding.sparse)
        out[f"{name}.scale"] = scale
    elif encoding.bits == 16:
        values = tensor.to(torch.float16)
    else:
        values = tensor.to(torch.float32)
    if encoding.sparse:
        values = values.reshape(-1)[(tensor != 0).reshape(-1)]
    if encoding.bits in PACKED_BITS:
        values = pack_codes(values, encoding.bits)
    out[f"{name}.values"] = values.contiguous()
    return out


def _encode_clustered(name: str, tensor: torch.Tensor, encoding: TensorEncoding) -> dict[str, torch.Tensor]:
    centroids, indices = cluster_indices(tensor, encoding)
    out = {f"{name}.centroids": centroids}
    if encoding.huffman:
        lengths = huffman.code_lengths(np.bincount(indices, minlength=centroids.numel()))
        out[f"{name}.code_lengths"] = torch.from_numpy(lengths.astype(np.uint8))
        out[f"{name}.values"] = torch.from_numpy(huffman.encode(indices, lengths))
    else:
        out[f"{name}.values"] = pack_bits(indices, index_width(encoding.clusters))
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
    count = int(mask.sum()) if mask is not None else numel
    if encoding.clusters is not None:
        values = _decode_clustered(name, stored, count, encoding)
    elif encoding.bits in PACKED_BITS:
        values = unpack_codes(values, encoding.bits, count)
    if mask is not None:
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        values = dense
    values = values.reshape(shape)
    if encoding.bits in INTEGER_BITS:
        return dequantize(values, stored[f"{name}.scale"])
    return values.to(torch.float32)


def _decode_clustered(name: str, stored: dict[str, torch.Tensor], count: int, encoding: TensorEncoding) -> torch.Tensor:
    centroids = stored[f"{name}.centroids"]
    values = stored[f"{name}.values"]
    if encoding.huffman:
        indices = huffman.decode(values.numpy(), stored[f"{name}.code_lengths"].numpy(), count)
    else:
        indices = unpack_bits(values, index_width(encoding.clusters), count)
    return centroids[torch.from_numpy(indices)]
