"""Slimmable networks: one set of weights that runs at several widths, the width chosen when it runs.

Slimmable networks (Yu et al., ICLR 2019) and universally slimmable networks (Yu and Huang, ICCV 2019) train one
network whose sub-networks at width multipliers (0.25, 0.5, 0.75, 1.0) all work: a device picks the width that fits
its battery, load or deadline, and ships one set of weights instead of a model per budget.

How netshrink does it, on any model Torch-Pruning can trace:

- **Channel groups.** Torch-Pruning's dependency graph gives the groups of coupled channels (a convolution's
  outputs, its BatchNorm, the next layer's inputs, every branch of a residual add, a concatenation's slice), as
  channel pruning uses them. The output layer, a transformer's embedding width and the widths attention reads stay
  whole (``pruning.whole_width_layers``).
- **Ordered channels.** Each group's channels are reordered once, most important (L1 norm, Torch-Pruning's
  ``MagnitudeImportance``) first, so a width keeps a prefix of every group: the sub-network at 0.5 is the first half
  of the channels of each group, and the narrower widths are nested in the wider ones.
- **Training: the sandwich rule with in-place distillation** (Yu and Huang). Each batch trains the widest network on
  the task's loss, and the narrowest plus ``sandwich`` widths drawn at random on the widest one's predictions (soft
  cross-entropy), the gradients summed into one step. A narrower width is the full network with the channels past
  its prefix held at zero (the outputs of the group's layers and normalisations masked); the BatchNorm running
  statistics are updated only by the widest network.
- **BatchNorm statistics per width**, by recalibration after training (Yu and Huang, section 3.3): each narrower
  width's statistics are measured on training samples and stored beside the weights (a few floats per channel).
- **The artifact stores the weights once**: the widest network, plus the narrower widths' BatchNorm statistics.
  ``sliced`` builds the sub-network of a width with its channels physically removed (Torch-Pruning), so it runs at the
  speed of a network of that width.

It refuses, naming the layer, a model with a layer whose channels it cannot reorder (LayerNorm or GroupNorm on a
sliced width, grouped convolutions other than depthwise, transposed convolutions), and checks on the example inputs
that each width's masked network computes what its sliced network computes.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch_pruning as tp
from pydantic import Field, model_validator
from torch import nn

from .attention import find_head_splits
from .base import APPLIED, CompressionContext, Stage, Technique, TechniqueConfig, all_outputs
from .inputs import Inputs, WidthLogits, batch_size, call, logits_of, map_tensors, output_layers, take
from .pruning import rounded_kept, whole_width_layers

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
RECALIBRATION_BATCH = 64


class SlimmableConfig(TechniqueConfig):
    kind: Literal["slimmable"] = "slimmable"
    narrowest: float = Field(0.25, gt=0.0, lt=1.0, description="the narrowest width multiplier (the share of each channel group it keeps)")
    count: int = Field(4, ge=2, le=8, description="widths from the narrowest to 1.0, evenly spaced: 4 from 0.25 gives 0.25, 0.5, 0.75, 1.0")
    sandwich: int = Field(
        2, ge=0, le=6,
        description="widths drawn at random per batch besides the widest and the narrowest (the sandwich rule; Yu and Huang train 2)",
    )
    round_to: int = Field(
        8, ge=1, le=64,
        description="a width's channel count per group is rounded to a multiple of this where that moves it by at most a fifth "
        "(ONNX Runtime's CPU convolutions work in blocks of 8 channels; as channel pruning's round_to)",
    )
    channels: dict[str, list[int]] | None = Field(
        None,
        json_schema_extra=APPLIED,
        description="per channel group (its first layer), the channels each width keeps, narrowest first, written when applied",
    )

    @model_validator(mode="after")
    def _counts_match_widths(self) -> "SlimmableConfig":
        for root, kept in (self.channels or {}).items():
            if len(kept) != self.count or kept != sorted(kept):
                raise ValueError(f"slimmable.channels[{root!r}]: {kept} must list one channel count per width ({self.count}), narrowest first")
        return self

    def widths(self) -> tuple[float, ...]:
        """The width multipliers, narrowest first, the last 1.0."""
        return tuple(round(self.narrowest + (1.0 - self.narrowest) * index / (self.count - 1), 4) for index in range(self.count))


def width_name(width: float) -> str:
    """``0.5`` -> ``"0.5"``: how a width is written in metric names (``width_0.5/accuracy``) and file names."""
    return f"{width:g}"


@dataclass(frozen=True)
class GroupItem:
    """One layer of a channel group: its module name, whether the group holds its outputs or its inputs, and which of
    its channels (``idxs``) belong to which channel of the group's first layer (``roots``)."""

    module: str  # a module's name; for side "parameter", a parameter's
    side: Literal["out", "in", "parameter"]
    idxs: tuple[int, ...]
    roots: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    root: str  # the module name of the group's first layer
    channels: int
    items: tuple[GroupItem, ...]


def channel_groups(model: nn.Module, example_inputs: Inputs, keep_whole: frozenset[str] = frozenset()) -> list[ChannelGroup]:
    """The groups of coupled channels a width can slice, from Torch-Pruning's dependency graph: every group rooted at
    a convolution or linear layer, except the layers in ``keep_whole`` (the output layer) and those whose width must
    stay whole (``pruning.whole_width_layers``)."""
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    ignored = [modules[name] for name in keep_whole if name in modules]
    # attention's q, k, v: the forward pass reshapes them by a head count, so their widths stay whole (as channel pruning's)
    split_layers = [modules[name] for name in find_head_splits(model, example_inputs)]
    ignored += split_layers
    ignored += whole_width_layers(model, example_inputs, [layer for layer in layers if layer not in ignored], split_layers)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=all_outputs)
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        root = group[0].dep.target.module
        items: dict[tuple[str, str], GroupItem] = {}
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):  # a parameter outside any layer (a custom layer's gain): sliced along its channel axis
                name = next(n for n, p in model.named_parameters() if p is module)
                items.setdefault((name, "parameter"), GroupItem(name, "parameter", tuple(int(i) for i in item.idxs), tuple(int(r) for r in item.root_idxs)))
                continue
            if module not in names:
                continue  # Torch-Pruning's own nodes (an add, a concatenation, a flatten): nothing to reorder
            side = "out" if item.dep.handler == graph.get_pruner_of_module(module).prune_out_channels else "in"
            if isinstance(module, NORMS):
                side = "out"  # a BatchNorm's inputs are its outputs
            key = (names[module], side)
            if key not in items:
                items[key] = GroupItem(names[module], side, tuple(int(i) for i in item.idxs), tuple(int(r) for r in item.root_idxs))
        for item in items.values():
            if item.side != "parameter":
                check_reorderable(modules[item.module], item)
        groups.append(ChannelGroup(names[root], len(group[0].idxs), tuple(items.values())))
    if not groups:
        raise ValueError("slimmable: this model has no channels a width could slice (every layer's width is the output's, or must stay whole)")
    return groups


def check_reorderable(module: nn.Module, item: GroupItem) -> None:
    """``ValueError`` naming the layer when its channels cannot be sliced by a width."""
    if channel_tensors(module, item.side) is None:
        raise ValueError(
            f"slimmable: {item.module!r} ({type(module).__name__}) shares a width with sliced channels, and netshrink cannot slice its "
            "channels (it slices convolutions, linear layers, BatchNorm and depthwise convolutions; a LayerNorm or GroupNorm normalises "
            "over the whole width, so a narrower width would change every channel)"
        )


def channel_tensors(module: nn.Module, side: str) -> list[tuple[torch.Tensor, int]] | None:
    """The tensors of ``module`` that hold the channels of its ``side``, each with its channel axis; None for a module
    netshrink cannot slice."""
    own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b.dtype.is_floating_point]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and not (module.groups == module.in_channels == module.out_channels):
            return None
        if side == "in":
            return [] if module.groups > 1 else [(module.weight, 1)]  # depthwise: its inputs are its outputs, sliced with them
        return [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        if side == "in":
            return [(module.weight, 1)]
        return [(module.weight, 0)] + ([(module.bias, 0)] if module.bias is not None else [])
    if isinstance(module, NORMS):
        return [(t, 0) for t in (module.weight, module.bias, module.running_mean, module.running_var) if t is not None]
    return [] if not own else None


@torch.no_grad()
def reorder(model: nn.Module, group: ChannelGroup, order: list[int]) -> None:
    """Move the channels of ``group`` so that its root channels come in ``order`` (most important first), in every
    layer of the group, its coupled positions with them."""
    rank = {root: position for position, root in enumerate(order)}
    modules = dict(model.named_modules())
    for item in group.items:
        positions = sorted(item.idxs)
        ranked = [idx for idx, _ in sorted(zip(item.idxs, item.roots), key=lambda pair: (rank[pair[1]], pair[0]))]
        if item.side == "parameter":
            parameter = model.get_parameter(item.module)
            tensors = [(parameter, parameter_axis(parameter))]
        else:
            tensors = channel_tensors(modules[item.module], item.side) or []
        for tensor, axis in tensors:
            permutation = list(range(tensor.shape[axis]))
            for position, source in zip(positions, ranked):
                permutation[position] = source
            tensor.copy_(tensor.index_select(axis, torch.tensor(permutation, device=tensor.device)))


def parameter_axis(parameter: torch.Tensor) -> int:
    """The channel axis of a parameter outside any layer: its last axis longer than 1, as Torch-Pruning prunes it."""
    return max(axis for axis, size in enumerate(parameter.shape) if size > 1)


def kept_channels(channels: int, widths: tuple[float, ...], round_to: int) -> list[int]:
    """The channels each width keeps of a group of ``channels``: at least one, the widest all of them."""
    kept = [channels if width >= 1.0 else rounded_kept(max(1, round(width * channels)), channels, round_to) for width in widths]
    return [min(channels, max(1, count)) for count in kept]


def blocks(group: ChannelGroup) -> list[list[int]]:
    """The group's channels (its root's positions) split where a layer holds only some of them: the two halves of a
    concatenation feeding one residual stage are one group of Torch-Pruning's, but a channel of the left branch can
    never move to the right one's place. Channels are reordered within a block, and a width keeps a share of each."""
    signature: dict[int, list[int]] = {root: [] for root in range(group.channels)}
    for number, item in enumerate(group.items):
        covered = set(item.roots)
        if len(covered) < group.channels:
            for root in covered:
                signature[root].append(number)
    found: dict[tuple[int, ...], list[int]] = {}
    for root in range(group.channels):
        found.setdefault(tuple(signature[root]), []).append(root)
    return sorted(found.values())


def kept_roots(group: ChannelGroup, count: int) -> set[int]:
    """The channels (root positions) a width of ``count`` channels keeps: the first ``count`` of a group of one block,
    else each block's first share of ``count``, at least one channel of each (nested from width to width)."""
    parts = blocks(group)
    if len(parts) == 1:
        return set(range(count))
    return {root for part in parts for root in part[: max(1, round(count * len(part) / group.channels))]}


def block_order(group: ChannelGroup, scores: torch.Tensor) -> list[int]:
    """The order of the group's channels, most important first within each block, each block keeping its places:
    ``order[position]`` is the channel that moves to ``position``."""
    order = list(range(group.channels))
    for part in blocks(group):
        ranked = sorted(part, key=lambda root: (-float(scores[root]), root))
        for position, root in zip(part, ranked):
            order[position] = root
    return order


def channel_masks(groups: list[ChannelGroup], kept: dict[str, list[int]], index: int, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per module whose outputs a group holds: 1 for the output channels width ``index`` keeps, 0 for the others;
    only modules that lose a channel at that width."""
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        count = kept[group.root][index]
        if count >= group.channels:
            continue
        keep = kept_roots(group, count)
        for item in group.items:
            if item.side != "out":
                continue
            module = modules[item.module]
            size = channel_count(module)
            mask = masks.get(item.module, torch.ones(size))
            for idx, root in zip(item.idxs, item.roots):
                if root not in keep:
                    mask[idx] = 0.0
            masks[item.module] = mask
    return masks


def channel_count(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features


def _masking_hook(mask: torch.Tensor, linear: bool):
    placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # the mask on the output's device, copied there once

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        key = (output.device, output.dtype)
        if key not in placed:
            placed[key] = mask.to(output.device, output.dtype)
        scale = placed[key]
        return output * (scale if linear else scale.view(1, -1, *([1] * (output.dim() - 2))))

    return hook


class WidthStatistics(nn.Module):
    """The BatchNorm running statistics of one narrower width (recalibrated after training): per BatchNorm, its mean and
    variance, under the BatchNorm's name with dots as double underscores."""

    def __init__(self, norms: dict[str, int]) -> None:
        super().__init__()
        for name, channels in norms.items():
            key = name.replace(".", "__")
            self.register_buffer(f"{key}__mean", torch.zeros(channels))
            self.register_buffer(f"{key}__var", torch.ones(channels))

    def of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = name.replace(".", "__")
        return getattr(self, f"{key}__mean"), getattr(self, f"{key}__var")


class SlimmableNet(nn.Module):
    """A network that runs at several widths: ``model`` is the widest, ``statistics[i]`` the BatchNorm statistics of the
    i-th narrower width. In evaluation it runs at ``width`` (the widest unless ``at_width`` says otherwise); in training
    it returns ``WidthLogits`` for the sandwich rule."""

    def __init__(self, model: nn.Module, widths: tuple[float, ...], kept: dict[str, list[int]], sandwich: int) -> None:
        super().__init__()
        self.model = model
        self.widths = tuple(widths)
        self.kept = {root: list(counts) for root, counts in kept.items()}
        self.sandwich = sandwich
        norms = {name: m.num_features for name, m in model.named_modules() if isinstance(m, NORMS) and m.track_running_stats}
        self.statistics = nn.ModuleList([WidthStatistics(norms) for _ in self.widths[:-1]])
        self.groups: list[ChannelGroup] | None = None  # set by ``attach``: needed to run a narrower width (not stored)
        self._hooks: dict[int, dict[str, Any]] = {}  # width index -> module name -> its masking hook

    def attach(self, groups: list[ChannelGroup]) -> "SlimmableNet":
        missing = sorted({group.root for group in groups} ^ set(self.kept))
        if missing:
            raise ValueError(f"slimmable.channels: the groups of this model and the recipe's differ at {missing[:3]}: the model is not the one the recipe was written on")
        self.groups = groups
        self._hooks = {}
        return self

    @contextmanager
    def masked(self, index: int) -> Iterator[None]:
        """The network at width ``widths[index]``: the channels past each group's prefix held at zero."""
        if self.groups is None:
            raise RuntimeError("slimmable: the channel groups are not attached (SlimmableNet.attach)")
        modules = dict(self.model.named_modules())
        if index not in self._hooks:  # the masks of a width, worked out once (a batch runs several widths)
            self._hooks[index] = {
                name: _masking_hook(mask, isinstance(modules[name], nn.Linear)) for name, mask in channel_masks(self.groups, self.kept, index, modules).items()
            }
        hooks = [modules[name].register_forward_hook(hook) for name, hook in self._hooks[index].items()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def at_width(self, index: int) -> Iterator[None]:
        """The network at width ``widths[index]`` with that width's BatchNorm statistics, for evaluation."""
        if index == len(self.widths) - 1:
            yield
            return
        saved = self._swap_statistics(index)
        try:
            with self.masked(index):
                yield
        finally:
            self._restore_statistics(saved)

    def _swap_statistics(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        saved = {}
        for name, norm in self.model.named_modules():
            if isinstance(norm, NORMS) and norm.track_running_stats:
                saved[name] = (norm.running_mean.clone(), norm.running_var.clone())
                mean, var = self.statistics[index].of(name)
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
        return saved

    def _restore_statistics(self, saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        norms = dict(self.model.named_modules())
        for name, (mean, var) in saved.items():
            norms[name].running_mean.copy_(mean)
            norms[name].running_var.copy_(var)

    def drawn(self) -> list[int]:
        """The narrower widths of one training batch: the narrowest, and ``sandwich`` of those between it and the widest."""
        between = list(range(1, len(self.widths) - 1))
        chosen = random.sample(between, min(self.sandwich, len(between)))
        return [0] + sorted(chosen, reverse=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training or self.groups is None:
            return self.model(*args, **kwargs)
        outputs = [logits_of(self.model(*args, **kwargs))]
        with frozen_statistics(self.model):  # the running statistics are the widest network's
            for index in self.drawn():
                with self.masked(index):
                    outputs.append(logits_of(self.model(*args, **kwargs)))
        return WidthLogits(outputs)

    @torch.no_grad()
    def recalibrate(self, inputs: Inputs) -> None:
        """Measure each narrower width's BatchNorm statistics on ``inputs`` (training samples), in evaluation mode but
        for the BatchNorms, which average over every batch (momentum None)."""
        norms = [m for m in self.model.modules() if isinstance(m, NORMS) and m.track_running_stats]
        if not norms:
            return
        was_training = self.training
        saved = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms}
        self.eval()
        try:
            for index in range(len(self.widths) - 1):
                for norm in norms:
                    norm.reset_running_stats()
                    norm.momentum = None
                    norm.train()
                with self.masked(index):
                    for start in range(0, batch_size(inputs), RECALIBRATION_BATCH):
                        call(self.model, take(inputs, start, start + RECALIBRATION_BATCH))
                for name, norm in self.model.named_modules():
                    if isinstance(norm, NORMS) and norm.track_running_stats:
                        mean, var = self.statistics[index].of(name)
                        mean.copy_(norm.running_mean)
                        var.copy_(norm.running_var)
        finally:
            for norm in norms:
                mean, var, batches, momentum = saved[id(norm)]
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(batches)
                norm.momentum = momentum
            self.train(was_training)


@contextmanager
def frozen_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics left as they are (momentum 0) while the forward passes inside run."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def sliced(net: SlimmableNet, index: int, example_inputs: Inputs) -> nn.Module:
    """The sub-network of width ``widths[index]`` with the channels past each group's prefix physically removed
    (Torch-Pruning) and that width's BatchNorm statistics: a plain model of that width, as it is deployed."""
    if net.groups is None:
        raise RuntimeError("slimmable: the channel groups are not attached (SlimmableNet.attach)")
    model = copy.deepcopy(net.model).eval()
    if index == len(net.widths) - 1:
        return model
    for name, norm in model.named_modules():
        if isinstance(norm, NORMS) and norm.track_running_stats:
            mean, var = net.statistics[index].of(name)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=all_outputs)
    modules = dict(model.named_modules())
    for group in net.groups:
        count = net.kept[group.root][index]
        if count < group.channels:
            root = modules[group.root]
            keep = kept_roots(group, count)
            removed = [channel for channel in range(group.channels) if channel not in keep]
            with torch.no_grad():
                graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=removed).prune()
    return model


def check_widths(net: SlimmableNet, example_inputs: Inputs) -> None:
    """``ValueError`` when a width's masked network (what trains) and its sliced network (what ships) disagree: an
    operation of the model does not keep a zeroed channel at zero."""
    was_training = net.training
    net.eval()
    try:
        for index, width in enumerate(net.widths[:-1]):
            with torch.no_grad(), net.at_width(index):
                masked = logits_of(call(net.model, example_inputs))
            shipped_model = sliced(net, index, example_inputs)
            with torch.no_grad():
                shipped = logits_of(call(shipped_model, example_inputs))
            gap = float((masked - shipped).abs().max())
            scale = float(masked.abs().max()) or 1.0
            if not math.isfinite(gap) or gap > 1e-4 * max(1.0, scale):
                raise ValueError(
                    f"slimmable: at width {width_name(width)} the network with its channels masked and the network with them removed differ "
                    f"by {gap:.3g}: an operation of this model does not keep a removed channel at zero (a bias added after a "
                    "normalisation, a sigmoid, a LayerNorm over the channels); netshrink cannot train its widths"
                )
    finally:
        net.train(was_training)


class Slimmable(Technique):
    summary = 'dynamic width: one network trained to run at several channel widths (sandwich rule, in-place distillation), the width chosen when it runs'
    config_type: ClassVar[type[TechniqueConfig]] = SlimmableConfig
    stage: ClassVar[Stage] = Stage.DYNAMIC
    default_space: ClassVar[dict[str, Any]] = {
        "narrowest": {"low": 0.25, "high": 0.75},
        "count": {"low": 2, "high": 4},
    }
    excludes: ClassVar[frozenset[str]] = frozenset({"pruning", "early_exit"})
    exclusion_reason: ClassVar[str] = (
        "a slimmable network's widths are the channels it keeps, nested in each other; pruning removes channels or weights the "
        "narrower widths are built from, and early exits are a second dynamic form netshrink does not combine with widths"
    )

    def reshapes(self, config: SlimmableConfig) -> bool:
        return False  # the widest network keeps every shape; the widths' statistics are its own tensors

    def resolve(self, model: nn.Module, config: SlimmableConfig, ctx: CompressionContext) -> SlimmableConfig:
        groups = channel_groups(model, ctx.example_inputs, ctx.protected_modules)
        kept = {group.root: kept_channels(group.channels, config.widths(), config.round_to) for group in groups}
        if config.channels is not None and config.channels != kept:
            root = next(r for r in sorted(set(kept) | set(config.channels)) if kept.get(r) != config.channels.get(r))
            raise ValueError(
                f"slimmable.channels: the recipe keeps {config.channels.get(root)} channels of {root!r} at its widths and this model "
                f"{kept.get(root)}: the model differs from the one the recipe was written on"
            )
        return config.model_copy(update={"channels": kept})

    def apply(self, model: nn.Module, config: SlimmableConfig, ctx: CompressionContext) -> nn.Module:
        groups = channel_groups(model, ctx.example_inputs, ctx.protected_modules)
        importance = tp.importance.MagnitudeImportance(p=1)
        graph = tp.DependencyGraph().build_dependency(model, ctx.example_inputs, forward_fn=all_outputs)
        modules = dict(model.named_modules())
        was_training = model.training
        with torch.no_grad():
            before = logits_of(call(model.eval(), ctx.example_inputs))
        for group in groups:
            root = modules[group.root]
            scores = importance(graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=list(range(group.channels))))
            reorder(model, group, block_order(group, scores))
        with torch.no_grad():
            gap = float((logits_of(call(model, ctx.example_inputs)) - before).abs().max())
        model.train(was_training)
        if not gap <= 1e-4 * max(1.0, float(before.abs().max())):
            raise ValueError(
                f"slimmable: reordering the channels most important first changed the model's outputs by {gap:.3g}: a layer of it holds "
                "channels netshrink did not move with the others; netshrink cannot build widths of this model"
            )
        # after reordering, a channel's place is its rank: the groups again, read from the reordered model
        net = SlimmableNet(model, config.widths(), config.channels or {}, config.sandwich)
        net.attach(channel_groups(model, ctx.example_inputs, ctx.protected_modules))
        net.recalibrate(ctx.calibration_inputs if ctx.calibration_inputs is not None else ctx.example_inputs)
        check_widths(net, ctx.example_inputs)
        return net

    def finish(self, model: nn.Module, config: SlimmableConfig, ctx: CompressionContext) -> None:
        """Each narrower width's BatchNorm statistics, measured on training samples once fine-tuning is over."""
        net = find_slimmable(model)
        if net is not None:
            net.recalibrate(ctx.calibration_inputs if ctx.calibration_inputs is not None else ctx.example_inputs)

    def rebuild(self, model: nn.Module, config: SlimmableConfig) -> nn.Module:
        """The wrapper with placeholder statistics; the channel groups are attached where a width is run (``attach``)."""
        return SlimmableNet(model, config.widths(), config.channels or {}, config.sandwich)


def kept_axes(net: SlimmableNet, index: int, example_inputs: Inputs) -> dict[str, list[torch.Tensor]]:
    """Per parameter of the width's sub-network (``sliced``), the indices of the widest network's tensor it keeps along
    each axis. Read by slicing a copy whose every parameter holds its own flat positions (float64: exact to 2^53), so
    the indices are what Torch-Pruning's slicing took, however the groups couple (concatenations, flattened features)."""
    positions = copy.deepcopy(net).double()
    positions.groups = net.groups
    with torch.no_grad():
        for parameter in positions.model.parameters():
            parameter.copy_(torch.arange(parameter.numel(), dtype=torch.float64).reshape(parameter.shape))
    sub = sliced(positions, index, map_tensors(example_inputs, lambda t: t.double() if t.is_floating_point() else t))
    shapes = {name: p.shape for name, p in net.model.named_parameters()}
    kept: dict[str, list[torch.Tensor]] = {}
    for name, parameter in sub.named_parameters():
        flat = parameter.detach().to(torch.int64)
        coordinates = torch.unravel_index(flat, shapes[name])
        axes = []
        for axis, coordinate in enumerate(coordinates):
            line = coordinate.movedim(axis, 0).reshape(coordinate.shape[axis], -1)[:, 0] if coordinate.dim() else coordinate.reshape(1)
            axes.append(line)
        expected = torch.arange(math.prod(shapes[name])).reshape(shapes[name])
        for axis, line in enumerate(axes):
            expected = expected.index_select(axis, line)
        if not torch.equal(expected, flat):
            raise ValueError(f"slimmable: the width {width_name(net.widths[index])} of {name!r} is no slice along its axes")
        kept[name] = axes
    return kept


class WidthView(nn.Module):
    """Width ``index`` of a slimmable network as one module to export: the widest network's parameters, each indexed
    (``index_select``) down to the width's, run through the sub-network's structure. Exported without constant folding,
    the graph holds the widest weights and the indices, so every width's graph can share one weight file; ONNX
    Runtime folds the indexing into the weights when the session is made."""

    def __init__(self, net: SlimmableNet, index: int, example_inputs: Inputs) -> None:
        super().__init__()
        self.model = net.model  # first: the exported initializers are named as the slimmable network's weights
        self.skeleton = sliced(net, index, example_inputs)
        self.kept = kept_axes(net, index, example_inputs) if index < len(net.widths) - 1 else {}
        self.keys = list(example_inputs) if isinstance(example_inputs, dict) else None
        self.single = isinstance(example_inputs, torch.Tensor)
        for name, axes in self.kept.items():
            for axis, line in enumerate(axes):
                self.register_buffer(_index_name(name, axis), line, persistent=False)

    def weights(self) -> dict[str, torch.Tensor]:
        full = dict(self.model.named_parameters())
        if not self.kept:
            return dict(full)
        chosen = {}
        for name, axes in self.kept.items():
            tensor = full[name]
            for axis, line in enumerate(axes):
                if len(line) == tensor.shape[axis]:
                    continue
                if torch.equal(line, torch.arange(len(line))):  # a prefix (the common case): a Slice of two numbers, no index list
                    tensor = tensor.narrow(axis, 0, len(line))
                else:  # channels of several groups (a concatenation's): a Gather
                    tensor = tensor.index_select(axis, getattr(self, _index_name(name, axis)))
            chosen[name] = tensor
        return chosen

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        modules = dict(self.skeleton.named_modules())
        swapped = []
        for name, tensor in self.weights().items():
            owner, _, attribute = name.rpartition(".")
            module = modules[owner]
            swapped.append((module, attribute, module._parameters.pop(attribute)))
            setattr(module, attribute, tensor)
        try:
            inputs = dict(zip(self.keys, tensors)) if self.keys is not None else tensors[0] if self.single else tuple(tensors)
            return logits_of(call(self.skeleton, inputs))
        finally:
            for module, attribute, parameter in swapped:
                delattr(module, attribute)
                module._parameters[attribute] = parameter


def _index_name(name: str, axis: int) -> str:
    return f"kept__{name.replace('.', '__')}__{axis}"


def attached(net: SlimmableNet, example_inputs: Inputs) -> SlimmableNet:
    """``net`` with its channel groups, read from its model where it has none yet (a model loaded from an artifact)."""
    if net.groups is None:
        net.attach(channel_groups(net.model, example_inputs, output_layers(net.model, example_inputs)))
    return net


def find_slimmable(model: nn.Module) -> SlimmableNet | None:
    return next((m for m in model.modules() if isinstance(m, SlimmableNet)), None)
