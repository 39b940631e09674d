"""Weight clustering (weight sharing), optionally Huffman-coded: Deep Compression (Han et al., 2016).

Each layer's weights are grouped by 1-D k-means into ``clusters`` centroids;
every weight becomes its centroid, so the artifact stores k float32 centroids
and a small index per weight (ceil(log2 k) bits, or a Huffman code, which pays
because the indices are far from uniform). After pruning, only the surviving
weights are clustered and the pruned ones stay exactly zero.

During fine-tuning the centroids are the trainable parameters: the forward pass
reads ``centroids[index]``, so a centroid's gradient is the sum of the gradients
of the weights that share it, the update rule of the paper.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from .base import (
    PER_LAYER, CompressionContext, Stage, Technique, TechniqueConfig, attribute_of, compressible_weights, on_half_grid, per_layer,
    round_bias_to_half,
)
from .encoding import TensorEncoding
from .allocation import allocated_widths

LLOYD_ITERATIONS = 20  # 1-D k-means from a linear start settles within a few dozen iterations on layer weights


class ClusteringConfig(TechniqueConfig):
    VERSION: ClassVar[int] = 2  # 2: centroids and the clustered layers' biases on the float16 grid
    kind: Literal["clustering"] = "clustering"
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="uniform: every layer gets `clusters`; sensitivity: per-layer counts (256..4) averaging `average_bits` of index"
    )
    clusters: int = Field(16, ge=2, le=256, description="shared weight values (centroids) per layer")
    average_bits: float = Field(4.0, ge=2.0, le=8.0, description="allocation sensitivity: the average log2(clusters) over the stored weights")
    huffman: bool = Field(False, description="store the cluster indices Huffman-coded instead of at fixed width")
    layer_clusters: dict[str, Annotated[int, Field(ge=2, le=256)]] | None = Field(
        None,
        json_schema_extra=PER_LAYER,
        description="layer (module name) -> its own centroid count (Deep Compression: 256 for convolutions, 32 for fully connected layers)",
    )


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int = LLOYD_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (ascending, float32) and each value's cluster index, by Lloyd's algorithm.

    Centroids start evenly spaced (linear initialisation, which Han et al.
    found best because it keeps the rare large weights represented), over the
    negative and the positive range separately, shared out by count: after
    magnitude pruning no weight is left near zero, and one range from min to
    max spent most centroids on that empty middle (16 asked, 4 used on LeNet-5's
    fc1 at 90% sparsity). For dense weights the two ranges meet at zero. In 1-D the nearest centroid is found by bisecting the
    midpoints, so memory stays linear in the number of weights. An empty
    cluster keeps its centroid. Deterministic: no random start.
    """
    values = values.detach().reshape(-1).to(torch.float64)
    if values.numel() == 0:
        return torch.zeros(clusters, dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    centroids = linear_init(values, clusters)
    for _ in range(iterations):
        index = _nearest(values, centroids)
        counts = torch.bincount(index, minlength=clusters)
        sums = torch.bincount(index, weights=values, minlength=clusters)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    centroids = centroids.to(torch.float32)
    return centroids, _nearest(values.to(torch.float32), centroids)


def linear_init(values: torch.Tensor, clusters: int) -> torch.Tensor:
    negative, positive = values[values < 0], values[values >= 0]
    if clusters < 2 or negative.numel() == 0 or positive.numel() == 0:
        return torch.linspace(float(values.min()), float(values.max()), clusters, dtype=torch.float64)
    share = min(max(round(clusters * negative.numel() / values.numel()), 1), clusters - 1)
    return torch.cat(
        [
            torch.linspace(float(negative.min()), float(negative.max()), share, dtype=torch.float64),
            torch.linspace(float(positive.min()), float(positive.max()), clusters - share, dtype=torch.float64),
        ]
    )


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


class SharedWeights(nn.Module):
    """Parametrization: the weight is ``centroids[index]``, zero where ``keep`` is False (pruned), with the centroids
    on the float16 grid as the artifact stores them (gradients pass that rounding straight through)."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, keep: torch.Tensor | None) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("index", index)
        self.register_buffer("keep", keep)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shared = on_half_grid(self.centroids)[self.index].to(weight.dtype)
        return shared if self.keep is None else torch.where(self.keep, shared, torch.zeros_like(shared))


def cluster_weight(weight: torch.Tensor, clusters: int, sparse: bool) -> SharedWeights:
    """The parametrization that shares ``weight``'s values among ``clusters`` centroids (nonzeros only if ``sparse``)."""
    weight = weight.detach()
    keep = weight != 0 if sparse else None
    values = weight[keep] if sparse else weight.reshape(-1)
    centroids, assigned = kmeans_1d(values, clusters)
    index = torch.zeros(weight.shape, dtype=torch.long)
    if sparse:
        index[keep] = assigned
    else:
        index = assigned.reshape(weight.shape)
    return SharedWeights(centroids, index, keep)


class Clustering(Technique):
    summary = 'weight clustering: k-means shared values per layer, the indices optionally Huffman-coded (smaller, not faster)'
    config_type: ClassVar[type[TechniqueConfig]] = ClusteringConfig
    stage: ClassVar[Stage] = Stage.QUANTIZATION
    default_space: ClassVar[dict[str, Any]] = {
        "allocation": ["uniform", "sensitivity"],
        "clusters": [4, 8, 16, 32],
        "average_bits": {"low": 2.0, "high": 6.0},
        "huffman": [False, True],
    }
    conditions: ClassVar[dict[str, dict[str, Any]]] = {"clusters": {"allocation": "uniform"}, "average_bits": {"allocation": "sensitivity"}}
    excludes: ClassVar[frozenset[str]] = frozenset({"quantization"})
    exclusion_reason: ClassVar[str] = "both set the stored weight values; use one of them"

    def resolve(self, model: nn.Module, config: ClusteringConfig, ctx: CompressionContext) -> ClusteringConfig:
        """allocation sensitivity: the per-layer counts, written into ``layer_clusters`` (a given one is kept)."""
        if config.allocation == "uniform" or config.layer_clusters is not None:
            return config
        return config.model_copy(update={"layer_clusters": allocated_widths(model, "clustering", config.average_bits, ctx)})

    def apply(self, model: nn.Module, config: ClusteringConfig, ctx: CompressionContext) -> None:
        layers = compressible_weights(model)
        for name, clusters in per_layer(layers, config.layer_clusters, config.clusters, "clustering.layer_clusters").items():
            encoding = ctx.encodings.get(name, TensorEncoding())
            shared = cluster_weight(getattr(layers[name], attribute_of(name)), clusters, encoding.sparse)
            parametrize.register_parametrization(layers[name], attribute_of(name), shared)
            round_bias_to_half(layers[name], name)
            ctx.encodings[name] = TensorEncoding.model_validate({**encoding.model_dump(), "clusters": clusters, "huffman": config.huffman})
