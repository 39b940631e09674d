"""Per-layer widths from per-layer sensitivity: the allocator behind ``allocation: sensitivity``.

Given each layer's loss rise at each width (``sensitivity.measure_sensitivity``, measured once per baseline) and an
average width, a greedy allocator lowers, step by step, the layer whose loss rises least per bit it saves, until the
average over the stored weights is met (HAQ and HAWQ's mixed precision, with the simplest honest score). Quantization
and clustering call it; it imports neither of them, and ``sensitivity`` imports both: the three import one way.
"""

from __future__ import annotations

import math

from torch import nn

from .base import attribute_of, compressible_weights, module_of

QUANTIZATION_WIDTHS = (8, 4, 2, 1)  # the integer widths quantization stores
CLUSTER_COUNTS = (256, 64, 32, 16, 8, 4)  # 8, 6, 5, 4, 3 and 2 bits of index
Sensitivity = dict[str, dict[str, dict[int, float]]]  # "quantization" | "clustering" -> layer -> width -> loss rise


def width_bits(kind: str, width: int) -> float:
    """Bits per stored weight of a width: the bit width itself, or log2 of a cluster count."""
    return math.log2(width) if kind == "clustering" else float(width)


def allocate(scores: dict[str, dict[int, float]], sizes: dict[str, int], kind: str, average_bits: float) -> dict[str, int]:
    """Per layer, a width whose size-weighted average is at most ``average_bits``, chosen greedily by sensitivity.

    All layers start at the widest width; each step lowers the one layer whose
    loss rises least per bit saved (``sizes``: the weights each layer stores),
    until the average fits or every layer is at the narrowest width.
    Deterministic: ties go to the layer named first.
    """
    widths = sorted({width for layer in scores.values() for width in layer}, reverse=True)
    choice = {name: widths[0] for name in sizes}
    total = sum(sizes.values()) or 1

    def average() -> float:
        return sum(sizes[name] * width_bits(kind, choice[name]) for name in sizes) / total

    while average() > average_bits + 1e-9:
        moves = []
        for name in sorted(sizes):
            position = widths.index(choice[name])
            if position + 1 < len(widths) and sizes[name] > 0:
                lower = widths[position + 1]
                saved = sizes[name] * (width_bits(kind, choice[name]) - width_bits(kind, lower))
                rise = scores[name][lower] - scores[name][choice[name]]
                rise = math.inf if math.isnan(rise) else rise  # from one unbearable width to the next
                moves.append((rise / saved, name, lower))
        if not moves:
            break
        _, name, lower = min(moves)
        choice[name] = lower
    return choice


def allocated_widths(model: nn.Module, kind: str, average_bits: float, ctx) -> dict[str, int]:
    """``allocate`` for the compressible layers of ``model`` as it is now (pruned weights do not count)."""
    if not ctx.sensitivity or kind not in ctx.sensitivity:
        raise ValueError(f"{kind}.allocation sensitivity needs the baseline's per-layer sensitivity (compress(..., sensitivity=...))")
    measured = {name: {int(width): value for width, value in widths.items()} for name, widths in ctx.sensitivity[kind].items()}
    layers = {module_of(name): getattr(module, attribute_of(name)) for name, module in compressible_weights(model).items()}
    scores = {name: score_of(name, measured) for name in layers}
    sizes = {name: int((weight != 0).sum()) for name, weight in layers.items()}
    return allocate(scores, sizes, kind, average_bits)


def score_of(layer: str, measured: dict[str, dict[int, float]]) -> dict[int, float]:
    """The scores of ``layer``, or of the baseline layer it came from: an architecture technique renames
    ``conv2`` to ``conv2.0`` and ``conv2.1`` (separable, low-rank), early exits to ``segments.1.conv2``.
    A layer with no such origin (an exit head) is scored as unbearable to lower: it keeps the widest width."""
    if layer in measured:
        return measured[layer]
    parts = layer.split(".")
    origins = [name for name in measured if any(".".join(parts[start : start + len(name.split("."))]) == name for start in range(len(parts)))]
    if origins:
        return measured[max(origins, key=len)]
    widths = sorted({width for scores in measured.values() for width in scores}, reverse=True)
    return {width: 0.0 if index == 0 else math.inf for index, width in enumerate(widths)}
