"""How much each layer minds being stored at fewer bits, and the per-layer widths that follow from it.

Mixed precision in the manner of HAQ and HAWQ, with the simplest honest score:
for each layer and each width, the rise of the training loss when only that
layer's weights are quantized (or clustered) to that width, the rest of the
model left as it is. Measured once per baseline (the search caches it with the
baseline) and used by ``quantization`` and ``clustering`` with
``allocation: sensitivity``: given an average width, a greedy allocator lowers,
step by step, the layer whose loss rises least per bit it saves, until the
average over the stored weights is met. Deep Compression's hand choice for
LeNet-5 (8 bits for the convolutions, 5 for the large fully connected layers)
is the kind of split this finds: fc1 holds 93% of the weights and tolerates
fewer bits.

The scores are taken on the uncompressed baseline, so after pruning they are
an approximation; the allocation is written into the recipe (``layer_bits``,
``layer_clusters``), so a replay needs no scores.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import compressible_weights

QUANTIZATION_WIDTHS = (8, 4, 2, 1)  # the integer widths quantization stores
CLUSTER_COUNTS = (256, 64, 32, 16, 8, 4)  # 8, 6, 5, 4, 3 and 2 bits of index
Sensitivity = dict[str, dict[str, dict[int, float]]]  # "quantization" | "clustering" -> layer -> width -> loss rise


@torch.no_grad()
def _loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(inputs), batch):
        total += float(F.cross_entropy(model(inputs[start : start + batch]), labels[start : start + batch], reduction="sum"))
    return total / max(len(inputs), 1)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Sensitivity:
    """Per layer (module name) and width, the training-loss rise when that layer alone is stored at that width."""
    from .clustering import cluster_weight
    from .quantization import fake_quantize

    reference = _loss(model, inputs, labels)
    stored: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "quantization": lambda weight, bits: fake_quantize(weight, bits),
        "clustering": lambda weight, clusters: cluster_weight(weight, clusters, sparse=False)(weight),
    }
    widths = {"quantization": QUANTIZATION_WIDTHS, "clustering": CLUSTER_COUNTS}
    scores: Sensitivity = {kind: {} for kind in stored}
    probe = copy.deepcopy(model)
    for name, module in compressible_weights(probe).items():
        original = module.weight.detach().clone()
        for kind, transform in stored.items():
            layer = scores[kind].setdefault(name.removesuffix(".weight"), {})
            for width in widths[kind]:
                module.weight.copy_(transform(original, width))
                layer[width] = _loss(probe, inputs, labels) - reference
        module.weight.copy_(original)
    return scores


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
    scores = ctx.sensitivity[kind]
    layers = {name.removesuffix(".weight"): module for name, module in compressible_weights(model).items()}
    missing = [name for name in layers if name not in scores]
    if missing:
        raise ValueError(f"{kind}.allocation sensitivity: no sensitivity score for layer(s) {', '.join(missing)}; the model differs from the baseline it was measured on")
    sizes = {name: int((module.weight != 0).sum()) for name, module in layers.items()}
    return allocate({name: {int(w): v for w, v in scores[name].items()} for name in layers}, sizes, kind, average_bits)
