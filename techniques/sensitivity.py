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
from torch import nn

from .base import LossFn, attribute_of, compressible_weights, cross_entropy, module_of
from .inputs import Inputs, batch_size, forward_logits

QUANTIZATION_WIDTHS = (8, 4, 2, 1)  # the integer widths quantization stores
CLUSTER_COUNTS = (256, 64, 32, 16, 8, 4)  # 8, 6, 5, 4, 3 and 2 bits of index
Sensitivity = dict[str, dict[str, dict[int, float]]]  # "quantization" | "clustering" -> layer -> width -> loss rise


Batches = list[tuple[Inputs, object]]  # (model inputs, targets) per batch


@torch.no_grad()
def _loss(model: nn.Module, batches: Batches, loss_fn: LossFn) -> float:
    """Mean of ``loss_fn`` over ``batches``, weighted by batch size."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        size = batch_size(inputs)
        total += float(loss_fn(forward_logits(model, inputs), targets, inputs)) * size
        count += size
    return total / max(count, 1)


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, batches: Batches, loss_fn: LossFn = cross_entropy, progress: Callable[[int, int, str], None] | None = None
) -> Sensitivity:
    """Per layer (module name) and width, the training-loss rise when that layer alone is stored at that width.

    One pass over ``batches`` per layer and width (10 per layer): on a large model the longest step
    before a search, so ``progress(done, total, layer)`` hears of each layer finished."""
    from .clustering import cluster_weight
    from .quantization import fake_quantize

    reference = _loss(model, batches, loss_fn)
    stored: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "quantization": lambda weight, bits: fake_quantize(weight, bits),
        "clustering": lambda weight, clusters: cluster_weight(weight, clusters, sparse=False)(weight),
    }
    widths = {"quantization": QUANTIZATION_WIDTHS, "clustering": CLUSTER_COUNTS}
    scores: Sensitivity = {kind: {} for kind in stored}
    probe = copy.deepcopy(model)
    layers = compressible_weights(probe)
    for done, (name, module) in enumerate(layers.items(), start=1):
        weight = getattr(module, attribute_of(name))
        original = weight.detach().clone()
        for kind, transform in stored.items():
            layer = scores[kind].setdefault(module_of(name), {})
            for width in widths[kind]:
                weight.copy_(transform(original, width))
                layer[width] = _loss(probe, batches, loss_fn) - reference
        weight.copy_(original)
        if progress is not None:
            progress(done, len(layers), module_of(name))
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
