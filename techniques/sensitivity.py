"""How much each layer minds being stored at fewer bits, and the per-layer widths that follow from it.

Mixed precision in the manner of HAQ and HAWQ, with the simplest honest score:
for each layer and each width, the rise of the training loss when only that
layer's weights are quantized (or clustered) to that width, the rest of the
model left as it is. Measured once per baseline (the search caches it with the
baseline) and used by ``quantization`` and ``clustering`` with
``allocation: sensitivity`` (``allocation.allocate``): given an average width, a greedy
allocator lowers, step by step, the layer whose loss rises least per bit it saves,
until the average over the stored weights is met. Deep Compression's hand choice for
LeNet-5 (8 bits for the convolutions, 5 for the large fully connected layers)
is the kind of split this finds: fc1 holds 93% of the weights and tolerates
fewer bits.

The scores are taken on the uncompressed baseline, so after pruning they are
an approximation; the allocation is written into the recipe (``layer_bits``,
``layer_clusters``), so a replay needs no scores.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .allocation import CLUSTER_COUNTS, QUANTIZATION_WIDTHS, Sensitivity
from .base import LossFn, attribute_of, compressible_weights, cross_entropy, module_of
from .clustering import cluster_weight
from .quantization import fake_quantize
from .inputs import Inputs, batch_size, forward_logits

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
