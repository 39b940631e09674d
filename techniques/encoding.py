"""How one tensor is stored in the compressed artifact.

The storage plan (``TensorEncoding``) says what a technique promises: the
value format (float32, float16, 8/4/2/1-bit integer codes with one scale per
output channel, or cluster indices into a table of centroids, packed or
Huffman-coded) and whether zeros are free (``sparse``, after pruning). The
*layout* (``Layout``) is how the writer then stores it, chosen per tensor as
the smallest valid one and recorded in the artifact's header:

- ``dense``: every value;
- ``bitmask``: one bit per weight says where the nonzeros are, then only the nonzeros;
- ``gaps``: the nonzeros' positions as the runs of zeros between them
  (Deep Compression's relative indices), Rice-coded: each run r is
  ``r >> k`` in unary plus its low ``k`` bits, ``k`` chosen per tensor. The runs
  of a pruned layer are close to geometric, for which Rice codes are within a
  few hundredths of a bit of the entropy: at 8% density, about 0.41 bit per
  weight of the layer against 1 for the bitmask (the entropy limit is 0.40).
  When whole rows (output channels or neurons) are empty, as magnitude pruning
  leaves dead neurons (99 of LeNet-5's 500 fc1 rows under Deep Compression's
  recipe), a bitmask of the live rows (``rows``) comes first and the gaps run over
  the live rows only; the writer takes it where it is smaller.

Integer codes: 8-bit codes are int8; 4-, 2- and 1-bit codes are packed into
uint8 bytes (first code in the high bits, the last byte zero-padded). The 2-bit
grid is ternary (-s, 0, +s), and so is a pruned 1-bit layer (its zeros stay
zero): stored sparse, a ternary tensor keeps one sign bit per nonzero.

Clustered tensors (weight sharing) store their distinct values as centroids
and, per stored weight, a cluster index: packed at ceil(log2 k) bits, or as a
canonical Huffman bitstream plus one code length per centroid.

Small floats: a float32 part (plain values such as a bias, per-channel scales,
centroids) whose every value float16 holds exactly is stored as float16, which
loses nothing. Quantization and clustering put their scales, centroids and the
biases of the layers they compress on the float16 grid (``to_half_grid``), so
those parts cost 2 bytes a value: on Deep Compression's LeNet-5 the 256-entry
convolution codebooks and the 580 biases were 4.6 KB of a 46 KB file at float32.

``payload_bytes`` computes the bytes a plan writes without writing them, so the
size a technique promises can be checked against the bytes the writer produces.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import huffman

Bits = Literal[32, 16, 8, 4, 2, 1]

INTEGER_BITS = (8, 4, 2, 1)  # stored as codes + per-output-channel scales
PACKED_BITS = (4, 2, 1)  # codes packed 8 // bits to a byte
HALF_NORMAL = (2.0**-14, 65504.0)  # float16's normal range: inside it a value keeps 11 significant bits


def to_half_grid(values: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """``values`` rounded to the nearest float16 where float16 can hold them, left as they are elsewhere (such a
    tensor is then simply stored at float32).

    Where the absolute error is what counts (a bias, a centroid) that is float16's whole range: a subnormal is off
    by at most 2^-25. With ``relative`` (a scale, which multiplies every code of its channel) only zero and the
    normal range, where a value keeps 11 significant bits: a tiny scale would lose bits as a subnormal.
    """
    magnitude = values.abs()
    fits = magnitude <= HALF_NORMAL[1]
    if relative:
        fits &= (magnitude == 0) | (magnitude >= HALF_NORMAL[0])
    return torch.where(fits, values.to(torch.float16).to(values.dtype), values)


def half_exact(values: torch.Tensor) -> bool:
    """Whether float16 holds every value of the float ``values`` exactly (then the artifact stores them at 2 bytes)."""
    return bool(torch.equal(values.to(torch.float16).to(values.dtype), values))


def compact_float(values: torch.Tensor) -> torch.Tensor:
    """A float part as stored: float16 where that is exact, else float32."""
    return values.to(torch.float16) if half_exact(values) else values.to(torch.float32)


def float_bytes(values: torch.Tensor) -> int:
    """Bytes of a float part as ``compact_float`` stores it."""
    return values.numel() * (2 if half_exact(values) else 4)


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
        """Bytes this encoding writes for the float ``tensor`` (in its chosen layout), computed without serialising it."""
        return plan_layout(tensor, self).payload_bytes


class Layout(BaseModel):
    """How the writer stored one tensor: recorded per entry in the artifact's header."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    positions: Literal["dense", "bitmask", "gaps"] = "dense"
    nonzeros: int | None = None  # values stored in a sparse layout
    rice_k: int = Field(0, ge=0, le=8)  # low bits of each run of zeros, under ``gaps``
    rows: bool = False  # under ``gaps``: a bitmask of the rows with a nonzero comes first, and the gaps skip the empty ones
    value_format: str = "float32"  # what the values are, in words: float16, int4, ternary, binary, clustered(16), ...
    payload_bytes: int = 0  # positions + values + scales, centroids and code tables: the tensor's bytes in the file
    position_bytes: int = 0


def _out_channels(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def level_max(bits: int) -> int:
    """Largest code of the symmetric grid [-q, q]: 127 at 8 bits, 7 at 4, 1 at 2 (ternary) and 1 (binary)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


# MSE-optimal clipping for 4-bit grids: candidate scales f * max|w| / 7, f from 1 down to 0.3 in 36 steps
# (max-abs, f = 1, first: it wins ties, so a tensor already on its grid keeps exactly that grid).
CLIP_FACTORS = torch.linspace(1.0, 0.3, 36).tolist()


def channel_scales(weight: torch.Tensor, bits: int, sparse: bool = False) -> torch.Tensor:
    """Per-output-channel scale of the ``bits``-wide grid, chosen to keep the quantization error small, on the
    float16 grid (``to_half_grid``) so that the artifact stores it at 2 bytes.

    - 8 bits: max|w| / 127, so the largest weight is exact.
    - 4 bits: the scale among ``CLIP_FACTORS`` x max|w| / 7 with the least squared error:
      clipping a few large weights buys a finer step for all the others.
    - 2 bits: the grid is ternary {-s, 0, +s}; s and the zero threshold s/2 are the least-squares
      ternary fit (``ternary_scales``, the exact optimum that TWN approximates with 0.7 mean|w|).
      max|w| as the scale rounded 52-92% of LeNet-5's weights to zero.
    - 1 bit: mean|w| over the channel, the L2-optimal scale of sign(w) (XNOR-Net, Rastegari et al.
      2016); when the tensor is stored sparse the mean runs over the nonzeros only, since zeros stay zero.

    A zero channel gets scale 1. Rounding a scale to float16 changes the step by at most 2^-11 of itself, and
    the codes are taken on the rounded grid, so the weights are exactly what the artifact stores. Weights already
    on such a grid give their scale back exactly (quantizing twice changes nothing).
    """
    flat = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 0 else weight.detach().reshape(1, 1)
    flat = flat.to(torch.float32)
    if bits == 1:
        count = (flat != 0).sum(dim=1) if sparse else torch.full((flat.shape[0],), flat.shape[1])
        # summed in float64: a channel already at +-s gives s back exactly
        return to_half_grid((flat.abs().to(torch.float64).sum(dim=1) / count.clamp(min=1)).to(torch.float32), relative=True)
    if bits == 2:
        scale = ternary_scales(flat)
    elif bits == 4:
        scale = clipped_scales(flat, bits)
    else:
        scale = flat.abs().amax(dim=1) / level_max(bits)
    return to_half_grid(torch.where(scale > 0, scale, torch.ones_like(scale)), relative=True)


def ternary_scales(flat: torch.Tensor) -> torch.Tensor:
    """Per row, the s of the least-squares fit by {-s, 0, +s}.

    Keeping the m largest |w| at +/-s (s their mean) leaves an error of sum(w^2) - S_m^2 / m,
    S_m the sum of those m magnitudes, so the best m maximises S_m^2 / m: one sort and a
    cumulative sum per row. Summed in float64, so a row already on a ternary grid gives its s back exactly.
    """
    magnitudes = flat.abs().to(torch.float64).sort(dim=1, descending=True).values
    sums = magnitudes.cumsum(dim=1)
    kept = torch.arange(1, flat.shape[1] + 1, dtype=torch.float64)
    best = (sums * sums / kept).argmax(dim=1, keepdim=True)
    return (sums.gather(1, best) / (best + 1)).squeeze(1).to(torch.float32)


def clipped_scales(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row, the scale among ``CLIP_FACTORS`` x max|w| / q (each on the float16 grid, as stored) with the
    smallest squared quantization error."""
    q = level_max(bits)
    top = flat.abs().amax(dim=1, keepdim=True)
    best_scale, best_error = None, None
    for factor in CLIP_FACTORS:
        scale = to_half_grid(torch.where(top > 0, top * factor / q, torch.ones_like(top)), relative=True)
        error = ((torch.clamp(torch.round(flat / scale), -q, q) * scale - flat) ** 2).sum(dim=1, keepdim=True)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale.squeeze(1)


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
    return codes.to(torch.float32) * scale.to(torch.float32).reshape(view)


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


def value_format(encoding: TensorEncoding, codes: torch.Tensor | None = None) -> str:
    """The stored values in words; a 1-bit tensor with zeros (pruned, then binarised) is ternary."""
    if encoding.clusters is not None:
        return f"clustered({encoding.clusters})" + ("+huffman" if encoding.huffman else "")
    if encoding.bits == 32 and codes is not None and half_exact(codes):
        return "float16"  # float32 values that float16 holds exactly (a bias of a quantized layer)
    if encoding.bits == 2 or (encoding.bits == 1 and codes is not None and bool((codes == 0).any())):
        return "ternary"
    return {32: "float32", 16: "float16", 8: "int8", 4: "int4", 1: "binary"}[encoding.bits]


def _stored_form(tensor: torch.Tensor, encoding: TensorEncoding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values as the format holds them (integer codes, float16, or the float32 values) and the per-channel scales."""
    if encoding.clusters is not None or encoding.bits == 32:
        return tensor.to(torch.float32), None
    if encoding.bits == 16:
        return tensor.to(torch.float16), None
    scale = channel_scales(tensor, encoding.bits, encoding.sparse)
    return quantize_codes(tensor, scale, encoding.bits, encoding.sparse), scale


def _code_width(encoding: TensorEncoding, positions: str) -> int:
    """Bits per stored integer code: a ternary code stored sparse is nonzero, so its sign is all there is to keep."""
    if encoding.bits in (2, 1) and positions != "dense":
        return 1
    return encoding.bits


def _value_bytes(values: torch.Tensor, scale: torch.Tensor | None, encoding: TensorEncoding, positions: str) -> int | None:
    """Bytes of the stored ``values`` (1-D) with their ``scale``, or None where this layout cannot hold them."""
    count = values.numel()
    if encoding.clusters is not None:
        centroids, indices = torch.unique(values, sorted=True, return_inverse=True)
        if centroids.numel() > encoding.clusters:
            return None  # dense after sparse clustering: zero would be one centroid too many
        if encoding.huffman:
            frequencies = np.bincount(indices.numpy(), minlength=centroids.numel())
            lengths = huffman.code_lengths(frequencies)
            return float_bytes(centroids) + lengths.size + math.ceil(int((frequencies * lengths).sum()) / 8)
        return float_bytes(centroids) + math.ceil(count * index_width(encoding.clusters) / 8)
    if encoding.bits in INTEGER_BITS:
        if encoding.bits == 1 and positions == "dense" and bool((values == 0).any()):
            return None  # a binary code has no zero
        return math.ceil(count * _code_width(encoding, positions) / 8) + float_bytes(scale)
    if encoding.bits == 32:
        return float_bytes(values)
    return count * (encoding.bits // 8)


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """The number of zeros before each nonzero (after the previous one): Deep Compression's relative indices."""
    where = np.flatnonzero(mask)
    return np.diff(where, prepend=-1) - 1


def live_rows(mask: np.ndarray, rows: int) -> np.ndarray:
    """Which of the ``rows`` (the first axis) of the flat ``mask`` hold a nonzero."""
    return mask.reshape(rows, -1).any(axis=1) if mask.size else np.zeros(rows, dtype=bool)


def rice_bytes(runs: np.ndarray, k: int) -> int:
    unary = int((runs >> k).sum()) + runs.size
    return math.ceil(unary / 8) + math.ceil(runs.size * k / 8)


def best_rice_k(runs: np.ndarray) -> int:
    """The Rice parameter (0..8) that stores ``runs`` in the fewest bytes; the smallest such one."""
    return min(range(9), key=lambda k: (rice_bytes(runs, k), k))


def rice_encode(runs: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unary quotients (a 1 per unit of ``run >> k``, then a 0) packed to bytes, and the low ``k`` bits packed apart.

    Two streams, so both decode with array operations: the quotients are the gaps
    between the zeros of the first, the low bits a fixed-width array.
    """
    quotients = runs >> k
    bits = np.ones(int(quotients.sum()) + runs.size, dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0
    low = pack_bits((runs & ((1 << k) - 1)).astype(np.uint8), k) if k > 0 and runs.size else None
    return torch.from_numpy(np.packbits(bits)), low


def rice_decode(unary: torch.Tensor, low: torch.Tensor | None, k: int, count: int) -> np.ndarray:
    ends = np.flatnonzero(np.unpackbits(unary.numpy()) == 0)[:count]  # the last byte's padding is zeros too: take ``count``
    quotients = np.diff(ends, prepend=-1) - 1
    remainders = unpack_bits(low, k, count) if low is not None else np.zeros(count, dtype=np.int64)
    return (quotients.astype(np.int64) << k) | remainders


def plan_layout(tensor: torch.Tensor, encoding: TensorEncoding) -> Layout:
    """The smallest valid layout for ``tensor`` under ``encoding``: dense, bitmask or Rice-coded gaps.

    Only a plan with ``sparse`` (pruned weights) is stored sparse; ties go to the
    simpler layout (dense, then bitmask, then gaps).
    """
    tensor = tensor.detach().cpu()
    numel = tensor.numel()
    form, scale = _stored_form(tensor, encoding)
    flat = form.reshape(-1)
    channels = _out_channels(tuple(tensor.shape))
    name = value_format(encoding, form if encoding.bits in (32, 1) else None)
    options: list[Layout] = []
    dense = _value_bytes(flat, scale, encoding, "dense")
    if dense is not None:
        options.append(Layout(positions="dense", value_format=name, payload_bytes=dense))
    if encoding.sparse:
        mask = (flat != 0).numpy()
        nonzero = flat[torch.from_numpy(mask)]
        sparse_values = _value_bytes(nonzero, scale, encoding, "bitmask")
        runs = run_lengths(mask)
        k = best_rice_k(runs)
        candidates = [("bitmask", math.ceil(numel / 8), 0, False), ("gaps", rice_bytes(runs, k), k, False)]
        live = live_rows(mask, channels)
        if 0 < live.sum() < channels:
            live_runs = run_lengths(mask.reshape(channels, -1)[live].reshape(-1))
            live_k = best_rice_k(live_runs)
            candidates.append(("gaps", math.ceil(channels / 8) + rice_bytes(live_runs, live_k), live_k, True))
        for positions, cost, rice_k, rows in candidates:
            options.append(
                Layout(
                    positions=positions, nonzeros=int(nonzero.numel()), rice_k=rice_k, rows=rows, value_format=name,
                    payload_bytes=cost + sparse_values, position_bytes=cost,
                )
            )
    if not options:
        distinct = torch.unique(flat).numel()
        raise ValueError(
            f"tensor has {distinct} distinct values but is planned as clusters={encoding.clusters}: "
            "a clustered tensor must hold only its centroids"
        )
    return min(options, key=lambda layout: layout.payload_bytes)  # the first of equals: the simpler layout


def encode_tensor(name: str, tensor: torch.Tensor, encoding: TensorEncoding, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Tensors (keyed ``name`` + suffix) that store ``tensor`` under ``encoding`` in ``layout`` (default: ``plan_layout``)."""
    tensor = tensor.detach().cpu().contiguous()
    if not tensor.is_floating_point():
        return {name: tensor}
    layout = layout or plan_layout(tensor, encoding)
    form, scale = _stored_form(tensor, encoding)
    flat = form.reshape(-1)
    out: dict[str, torch.Tensor] = {}
    if layout.positions != "dense":
        mask = (flat != 0).numpy()
        if layout.positions == "bitmask":
            out[f"{name}.mask"] = torch.from_numpy(np.packbits(mask))
        else:
            coded = mask
            if layout.rows:
                live = live_rows(mask, _out_channels(tuple(tensor.shape)))
                out[f"{name}.rows"] = torch.from_numpy(np.packbits(live))
                coded = mask.reshape(len(live), -1)[live].reshape(-1)
            unary, low = rice_encode(run_lengths(coded), layout.rice_k)
            out[f"{name}.gaps"] = unary
            if low is not None:
                out[f"{name}.gaps_low"] = low
        flat = flat[torch.from_numpy(mask)]
    if encoding.clusters is not None:
        return {**out, **_encode_clustered(name, flat, encoding)}
    if scale is not None:
        out[f"{name}.scale"] = compact_float(scale)
        width = _code_width(encoding, layout.positions)
        flat = pack_codes(flat, width) if width in PACKED_BITS else flat
    elif encoding.bits == 32:
        flat = compact_float(flat)
    out[f"{name}.values"] = flat.contiguous()
    return out


def _encode_clustered(name: str, values: torch.Tensor, encoding: TensorEncoding) -> dict[str, torch.Tensor]:
    centroids, indices = torch.unique(values, sorted=True, return_inverse=True)
    if centroids.numel() > encoding.clusters:
        raise ValueError(
            f"tensor has {centroids.numel()} distinct values but is planned as clusters={encoding.clusters}: "
            "a clustered tensor must hold only its centroids"
        )
    indices = indices.numpy().astype(np.int64)
    out = {f"{name}.centroids": compact_float(centroids)}
    if encoding.huffman:
        lengths = huffman.code_lengths(np.bincount(indices, minlength=centroids.numel()))
        out[f"{name}.code_lengths"] = torch.from_numpy(lengths.astype(np.uint8))
        out[f"{name}.values"] = torch.from_numpy(huffman.encode(indices, lengths))
    else:
        out[f"{name}.values"] = pack_bits(indices, index_width(encoding.clusters))
    return out


def decode_tensor(
    name: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...], encoding: TensorEncoding, layout: Layout = Layout()
) -> torch.Tensor:
    """Inverse of ``encode_tensor``: the float32 (or original integer) tensor."""
    if name in stored:
        return stored[name]
    values = stored[f"{name}.values"]
    numel = math.prod(shape)
    mask = None
    if layout.positions == "bitmask":
        mask = torch.from_numpy(np.unpackbits(stored[f"{name}.mask"].numpy(), count=numel).astype(bool))
    elif layout.positions == "gaps":
        runs = rice_decode(stored[f"{name}.gaps"], stored.get(f"{name}.gaps_low"), layout.rice_k, layout.nonzeros or 0)
        rows = _out_channels(shape)
        live = np.unpackbits(stored[f"{name}.rows"].numpy(), count=rows).astype(bool) if layout.rows else np.ones(rows, dtype=bool)
        coded = np.zeros(int(live.sum()) * (numel // max(rows, 1)), dtype=bool)
        coded[np.cumsum(runs + 1) - 1] = True
        full = np.zeros((rows, numel // max(rows, 1)), dtype=bool)
        full[live] = coded.reshape(int(live.sum()), -1)
        mask = torch.from_numpy(full.reshape(-1))
    count = int(mask.sum()) if mask is not None else numel
    if encoding.clusters is not None:
        values = _decode_clustered(name, stored, count, encoding)
    else:
        width = _code_width(encoding, layout.positions)
        if width in PACKED_BITS:
            values = unpack_codes(values, width, count)
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
    return centroids.to(torch.float32)[torch.from_numpy(indices)]
