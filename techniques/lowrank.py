"""Low-rank factorization: a layer with an M x N weight becomes two layers through rank K.

``y = W x`` becomes ``y = B (A x)`` with A (K x N) and B (M x K): K(M + N) weights
instead of M N, so a layer is factored only where K(M + N) < M N. The factors
start as the truncated SVD of W, ``A = sqrt(S_K) V_K^T`` and ``B = U_K sqrt(S_K)``,
the best rank-K approximation of W in the least-squares sense (Eckart-Young), so
fine-tuning starts close to the original layer. K = ceil(rank_fraction * min(M, N)).

Linear layers are factored, and with ``convs`` also convolutions: ``1x1`` (the same
matrix applied at every pixel), or ``all`` (k x k ones too, as channel decomposition:
the O x I x k x k weight read as an O x (I k k) matrix becomes a k x k convolution to K
channels, keeping stride, padding and dilation, then a 1x1 convolution to O; Zhang et
al., 2015, "Accelerating Very Deep Convolutional Networks").
Only modules of exactly these types are replaced: a subclass such as attention's
output projection is read through ``.weight`` by its parent. A parent that reads
a plain ``nn.Linear`` child's ``.weight`` (``nn.TransformerEncoderLayer``'s fast
path does) breaks when that child is factored.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import skip_init

from .base import APPLIED, CompressionContext, Stage, Technique, TechniqueConfig, replace_layers, zero_init

Factorable = nn.Linear | nn.Conv2d
Initialise = Callable[[nn.Sequential, Factorable], None]


class LowRankConfig(TechniqueConfig):
    VERSION: ClassVar[int] = 2  # 2: ``convs`` (none, 1x1, all) instead of include_1x1_convs; k x k convolutions too
    kind: Literal["lowrank"] = "lowrank"
    rank_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="rank kept, as a fraction of the smaller of a layer's two dimensions"
    )
    convs: Literal["none", "1x1", "all"] = Field(
        "none", description="convolutions factored too: none, 1x1 (per-pixel channel mixing), or all (k x k ones as a k x k to K channels then a 1x1)"
    )
    ranks: dict[str, int] | None = Field(
        None,
        json_schema_extra=APPLIED,
        description="layer -> rank actually factored, written when applied; when given, exactly these layers at these ranks",
    )


def is_factorable(module: nn.Module, convs: str) -> bool:
    if type(module) is nn.Linear:
        return True
    if convs == "none" or type(module) is not nn.Conv2d or module.groups != 1:
        return False
    if module.kernel_size == (1, 1):
        return True
    # k x k, but not a patch embedding (stride = kernel: each patch projected on its own; Hugging Face's ViT reads its weight)
    return convs == "all" and module.stride != module.kernel_size


def _sides(layer: Factorable) -> tuple[int, int]:
    """The weight as a matrix: output channels x (input channels x kernel)."""
    return layer.weight.shape[0], layer.weight[0].numel()


def rank_for(layer: Factorable, rank_fraction: float) -> int:
    return max(1, math.ceil(rank_fraction * min(_sides(layer))))


def saves_parameters(layer: Factorable, rank: int) -> bool:
    rows, columns = _sides(layer)
    return rank * (rows + columns) < rows * columns


# Layers whose parent reads the child Linear's ``.weight`` itself (the fused fast path of PyTorch's transformer
# layers), so a factored pair in its place would break the parent's forward pass.
READ_BY_PARENT = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def read_by_parent(model: nn.Module) -> set[str]:
    """Names of the Linear children that a parent in ``READ_BY_PARENT`` reads directly."""
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, READ_BY_PARENT)
        for child, layer in module.named_children()
        if isinstance(layer, nn.Linear)
    }


def layers_to_factor(
    model: nn.Module, config: LowRankConfig, protected: frozenset[str] = frozenset(), notes: list[str] | None = None
) -> dict[str, int]:
    """Layer name -> rank: ``config.ranks`` when the recipe records them, else the layers that factoring shrinks,
    but not the ``protected`` ones (the output layer: factored to fewer dimensions than it has classes, it can no
    longer tell them apart; on LeNet-5 at rank 2 of 10 that cost 50 points of accuracy)."""
    if config.ranks is not None:
        for name, rank in config.ranks.items():
            layer = dict(model.named_modules()).get(name)
            if layer is None or not is_factorable(layer, config.convs):
                raise ValueError(f"lowrank.ranks: the recipe factors layer {name!r}, which this model has not as a plain Linear or a Conv2d lowrank.convs takes")
            if not 1 <= rank < min(_sides(layer)):
                raise ValueError(f"lowrank.ranks: rank {rank} for layer {name!r} of shape {_sides(layer)} is not between 1 and its smaller side")
        return dict(config.ranks)
    chosen: dict[str, int] = {}
    kept_whole = read_by_parent(model)
    for name, module in model.named_modules():
        if name in kept_whole and notes is not None and is_factorable(module, config.convs):
            notes.append(f"lowrank: {name!r} left whole: its parent, a {type(model.get_submodule(name.rpartition('.')[0])).__name__}, reads its weight directly")
        if name and name not in protected and name not in kept_whole and is_factorable(module, config.convs):
            rank = rank_for(module, config.rank_fraction)
            if saves_parameters(module, rank):
                chosen[name] = rank
    return chosen


def factor_pair(layer: Factorable, rank: int) -> nn.Sequential:
    """The two layers through ``rank`` replacing ``layer``, weights uninitialised; the second keeps the bias."""
    out_features, in_features = layer.weight.shape[:2]
    placement = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Sequential(
            skip_init(nn.Linear, in_features, rank, bias=False, **placement),
            skip_init(nn.Linear, rank, out_features, bias=has_bias, **placement),
        )
    first = skip_init(
        nn.Conv2d, in_features, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
        padding_mode=layer.padding_mode, bias=False, **placement,
    )
    return nn.Sequential(first, skip_init(nn.Conv2d, rank, out_features, 1, bias=has_bias, **placement))


@torch.no_grad()
def svd_init(pair: nn.Sequential, layer: Factorable) -> None:
    """Truncated SVD of ``layer``'s weight into the two factors, sqrt(S) on each side."""
    first, second = pair
    rank = first.weight.shape[0]
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
    second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
    if layer.bias is not None:
        second.bias.copy_(layer.bias)


def factor_layers(model: nn.Module, config: LowRankConfig, initialise: Initialise) -> None:
    builders = {name: partial(factor_pair, rank=rank) for name, rank in layers_to_factor(model, config).items()}
    replace_layers(model, builders, initialise)


class LowRank(Technique):
    summary = "low-rank factorization: a layer's weight becomes the product of two thin ones (truncated SVD), smaller and a little faster"
    config_type: ClassVar[type[TechniqueConfig]] = LowRankConfig
    stage: ClassVar[Stage] = Stage.ARCHITECTURE
    default_space: ClassVar[dict[str, Any]] = {
        "rank_fraction": {"low": 0.05, "high": 0.5, "log": True},
        "convs": ["none", "1x1", "all"],
    }

    def inapplicable(self, model: nn.Module) -> str | None:
        """Why low-rank factorization cannot change ``model``: no Linear it may factor."""
        kept_whole = read_by_parent(model)
        if not any(is_factorable(module, "all") and name not in kept_whole for name, module in model.named_modules() if name):
            return "the model has no plain Linear or ungrouped Conv2d it may factor; remove lowrank from the space"
        return None

    def resolve(self, model: nn.Module, config: LowRankConfig, ctx: CompressionContext) -> LowRankConfig:
        return config.model_copy(update={"ranks": layers_to_factor(model, config, ctx.protected_modules, ctx.notes)})

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: CompressionContext) -> None:
        factor_layers(model, config, svd_init)

    def rebuild(self, model: nn.Module, config: LowRankConfig) -> None:
        """The same layers factored, with zero placeholders for the weights the artifact then loads."""
        factor_layers(model, config, zero_init)
