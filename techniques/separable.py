"""Depthwise-separable convolutions (MobileNet): a k x k convolution from I to O channels becomes a
depthwise k x k convolution (one filter per input channel) followed by a pointwise 1x1 convolution.

That is k*k*I + I*O weights instead of k*k*I*O, so a convolution is replaced only
where k*k*I + I*O < k*k*I*O. Each output filter becomes, per input channel, a
scaled copy of that channel's one spatial filter. The initial weights are, for each
input channel i, the best rank-1 approximation u s v^T of W[:, i] seen as an
O x k*k matrix (Eckart-Young): depthwise filter sqrt(s) v, pointwise column sqrt(s) u.
So an exactly separable convolution is reproduced exactly, and any other is
approximated as well as a separable one can be, channel by channel.

``which`` picks among the k x k convolutions (groups 1, exactly ``nn.Conv2d``) in
module order. ``all_but_first`` keeps the stem whole, as MobileNet does: it sees
only a few input channels, so a depthwise filter per channel leaves it nearly
one spatial filter in all.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import skip_init

from .base import APPLIED, CompressionContext, Stage, Technique, TechniqueConfig, replace_layers, zero_init

Initialise = Callable[[nn.Sequential, nn.Conv2d], None]


class SeparableConfig(TechniqueConfig):
    kind: Literal["separable"] = "separable"
    which: Literal["all", "all_but_first", "last"] = Field(
        "all_but_first", description="which k x k convolutions, in module order, become depthwise + pointwise"
    )
    layers: tuple[str, ...] | None = Field(
        None, json_schema_extra=APPLIED, description="the convolutions actually separated, written when applied; when given, exactly these"
    )


def spatial_convs(model: nn.Module) -> list[str]:
    """Names of the k x k (k > 1) ungrouped convolutions, in module order.

    A patch embedding (stride equal to the kernel, as in a ViT) is not one: it projects each patch on its own, a
    linear layer in convolution's clothes, and models read its ``weight`` directly (Hugging Face's ViT takes the
    input dtype from it)."""
    return [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Conv2d and module.groups == 1 and module.kernel_size != (1, 1) and module.stride != module.kernel_size
    ]


def saves_parameters(conv: nn.Conv2d) -> bool:
    out_channels, in_channels, height, width = conv.weight.shape
    kernel = height * width
    return kernel * in_channels + in_channels * out_channels < kernel * in_channels * out_channels


def convs_to_separate(model: nn.Module, config: SeparableConfig) -> list[str]:
    """``config.layers`` when the recipe records them, else the chosen convolutions that separating shrinks."""
    names = spatial_convs(model)
    if config.layers is not None:
        missing = [name for name in config.layers if name not in names]
        if missing:
            raise ValueError(f"separable.layers: the recipe separates {', '.join(map(repr, missing))}, which this model has not as an ungrouped k x k Conv2d")
        return list(config.layers)
    chosen = {"all": names, "all_but_first": names[1:], "last": names[-1:]}[config.which]
    return [name for name in chosen if saves_parameters(model.get_submodule(name))]


def separable_pair(conv: nn.Conv2d) -> nn.Sequential:
    """Depthwise then pointwise convolution replacing ``conv``, weights uninitialised; the pointwise keeps the bias."""
    placement = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    channels = conv.in_channels
    depthwise = skip_init(
        nn.Conv2d, channels, channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=channels, bias=False, padding_mode=conv.padding_mode, **placement,
    )
    pointwise = skip_init(nn.Conv2d, channels, conv.out_channels, 1, bias=conv.bias is not None, **placement)
    return nn.Sequential(depthwise, pointwise)


@torch.no_grad()
def rank_one_init(pair: nn.Sequential, conv: nn.Conv2d) -> None:
    """Per input channel, the best rank-1 approximation of its O x k*k slice of the weight."""
    depthwise, pointwise = pair
    out_channels, in_channels, height, width = conv.weight.shape
    slices = conv.weight.transpose(0, 1).reshape(in_channels, out_channels, height * width)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    root = s[:, :1].sqrt()
    depthwise.weight.copy_((root * vh[:, 0]).reshape(depthwise.weight.shape))
    pointwise.weight.copy_((root * u[:, :, 0]).T.reshape(pointwise.weight.shape))
    if conv.bias is not None:
        pointwise.bias.copy_(conv.bias)


def separate_convs(model: nn.Module, config: SeparableConfig, initialise: Initialise) -> None:
    replace_layers(model, {name: separable_pair for name in convs_to_separate(model, config)}, initialise)


class Separable(Technique):
    summary = 'depthwise-separable substitution: a k x k convolution becomes a depthwise and a pointwise one (fewer multiply-adds, faster)'
    config_type: ClassVar[type[TechniqueConfig]] = SeparableConfig
    stage: ClassVar[Stage] = Stage.ARCHITECTURE
    default_space: ClassVar[dict[str, Any]] = {"which": ["all", "all_but_first", "last"]}

    def inapplicable(self, model: nn.Module) -> str | None:
        """Why separable substitution cannot change ``model``: it has no k x k convolution (a transformer)."""
        if not spatial_convs(model):
            return (
                "the model has no ungrouped k x k Conv2d to separate (a transformer's layers are Linear, its patch embedding "
                "projects each patch on its own); remove separable from the space"
            )
        return None

    def resolve(self, model: nn.Module, config: SeparableConfig, ctx: CompressionContext) -> SeparableConfig:
        return config.model_copy(update={"layers": tuple(convs_to_separate(model, config))})

    def apply(self, model: nn.Module, config: SeparableConfig, ctx: CompressionContext) -> None:
        separate_convs(model, config, rank_one_init)

    def rebuild(self, model: nn.Module, config: SeparableConfig) -> None:
        """The same convolutions replaced, with zero placeholders for the weights the artifact then loads."""
        separate_convs(model, config, zero_init)
