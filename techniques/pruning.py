"""Magnitude pruning, unstructured (weights) or structured (channels).

Deciding (importance scores), removing (masks or physical removal) and
measuring are separate steps, as in Torch-Pruning.

- ``weight``: the smallest-magnitude weights of each layer are zeroed and held
  at zero during fine-tuning; the artifact stores the layer sparse (bitmask +
  nonzeros), so bytes are saved, but the dense runtime is not faster.
- ``channel``: whole output channels/neurons with the smallest L1 (or L2) norm
  are physically removed with Torch-Pruning, which keeps coupled layers
  (residual adds, BatchNorm, concatenations) consistent, so the model really
  shrinks and runs faster; the output layer keeps all its classes.

With ``steps`` > 1 the ratio is reached gradually (Han et al., 2015: iterative
pruning and retraining), fine-tuning between steps.

Transformers. Channel pruning keeps a transformer's embedding width (the residual
stream every block adds to): a layer whose output channels Torch-Pruning's dependency
graph couples to a LayerNorm is left whole, so ``ratio`` removes MLP hidden neurons
(and the channels of any other layer outside the residual stream). Attention heads
go whole, by ``head_ratio``, through Torch-Pruning's head pruning (``num_heads``,
``prune_num_heads``): an attention module written as timm writes it (a ``qkv``
Linear, possibly factored by low-rank, and an int ``num_heads`` that its forward pass
reshapes by) loses the same heads from q, k, v and ``proj``, and its ``num_heads`` is
set to the heads left (the recipe records them, so loading sets them again).
``torch.nn.MultiheadAttention`` keeps its heads: Torch-Pruning cannot remove them, so
``head_ratio`` on such a model is refused, naming the layer.
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from .base import APPLIED, PER_LAYER, QUIET, CompressionContext, Stage, Technique, TechniqueConfig, all_outputs, attribute_of, compressible_weights, module_of, per_layer
from .attention import HeadSplit, config_heads, find_head_splits, head_attributes, set_attributes
from .encoding import TensorEncoding
from .inputs import Inputs, tensors


class PruningConfig(TechniqueConfig):
    # 2: heads found by the reshapes of the forward pass; ``heads`` maps attribute paths to values. 3: round_to moves a layer's
    # count by at most a fifth (LeNet-5's conv1 at 0.75 keeps 5 channels, not 8)
    VERSION: ClassVar[int] = 3
    kind: Literal["pruning"] = "pruning"
    granularity: Literal["weight", "channel"] = Field(
        "channel", description="weight: unstructured, stored sparse; channel: structured, channels removed"
    )
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of weights (or of channels per layer) removed")
    steps: int = Field(1, ge=1, le=10, description="prune in this many steps, fine-tuning between them")
    importance: Literal["l1", "l2"] = Field(
        "l1", description="channel norm that ranks channels (for single weights both rank alike)"
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="layer: every layer loses `ratio` of its weights (channels); global: one magnitude threshold over all "
        "layers removes `ratio` of all of them, so large layers lose more (Deep Compression kept 8% of LeNet-5's fc1, 66% of conv1)",
    )
    floor: float = Field(0.02, ge=0.0, lt=1.0, description="scope global: every layer keeps at least this fraction, so none is emptied")
    round_to: int = Field(
        8, ge=1, le=64, json_schema_extra=QUIET,
        description="channel, scope layer: a layer of at least twice this many channels keeps the nearest multiple of it where that "
        "moves its count by at most a fifth (ONNX Runtime's CPU convolutions work in blocks of 8 channels: MobileNetV2 pruned at 0.35 "
        "to 20, 10 and 62 channels ran 0.86x the speed of the unpruned model, to 16, 8 and 64 2.3x; LeNet-5's conv1 at 0.75 keeps 5, "
        "since 8 would be 60% more and cost the model a quarter of its size ratio); 1: exact ratios. Scope global keeps its threshold's counts",
    )
    layer_ratios: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None,
        json_schema_extra=PER_LAYER,
        description="layer (module name) -> its own ratio, as a published recipe gives them; layers not listed follow `ratio` and `scope`",
    )
    head_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="channel: share of each attention layer's heads removed (whole heads)")
    removed: dict[str, int] | None = Field(
        None,
        json_schema_extra=APPLIED,
        description="per layer, what went, written when applied: output channels (granularity channel) or weights zeroed (weight); "
        "a replay that removes anything else is refused, naming the layer",
    )
    heads: dict[str, int] | None = Field(
        None,
        json_schema_extra=APPLIED,
        description="the attention modules' head counts after pruning (module.attribute -> value: num_heads, all_head_size), written when applied",
    )


class WeightMask(nn.Module):
    """Parametrization that keeps pruned weights at exactly zero while the rest train."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask that drops the ``ratio`` smallest-|w| entries (ties broken by position, deterministically)."""
    flat = weight.detach().abs().reshape(-1)
    drop = int(round(ratio * flat.numel()))
    mask = torch.ones_like(flat)
    if drop > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:drop]] = 0.0
    return mask.reshape(weight.shape)


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Cumulative ratios after each step; every step removes the same fraction of what is left."""
    return [1.0 - (1.0 - ratio) ** ((step + 1) / steps) for step in range(steps)]


def _between_steps(model: nn.Module, step: int, steps: int, ctx: CompressionContext) -> None:
    if step < steps - 1 and ctx.fine_tune is not None:
        ctx.fine_tune(model, ctx.loss_fn)


def global_ratios(weights: dict[str, torch.Tensor], ratio: float, floor: float) -> dict[str, float]:
    """Per layer, the share of its weights under one magnitude threshold that removes ``ratio`` of all of them,
    capped so that every layer keeps at least ``floor`` of its own."""
    magnitudes = torch.cat([weight.detach().abs().reshape(-1) for weight in weights.values()])
    drop = int(round(ratio * magnitudes.numel()))
    if drop == 0:
        return {name: 0.0 for name in weights}
    threshold = magnitudes.kthvalue(drop).values
    return {name: min(float((weight.detach().abs() <= threshold).float().mean()), 1.0 - floor) for name, weight in weights.items()}


def listed_ratios(layers: dict[str, nn.Module], config: PruningConfig) -> dict[str, float]:
    """The layers ``layer_ratios`` names, by parameter name, with their ratios."""
    return {name: ratio for name, ratio in per_layer(layers, config.layer_ratios, None, "pruning.layer_ratios").items() if ratio is not None}


def layer_sizes(model: nn.Module, granularity: str) -> dict[str, int]:
    """Per compressible layer (module name): its output channels (features) for channel pruning, its nonzero weights for weight pruning."""
    sizes = {}
    for name, module in compressible_weights(model).items():
        weight = getattr(module, attribute_of(name))
        sizes[module_of(name)] = int(weight.shape[0]) if granularity == "channel" else int((weight != 0).sum())
    return sizes


def prune_weights(model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
    layers = compressible_weights(model)
    listed = listed_ratios(layers, config)
    for step in range(config.steps):
        ratios = {name: step_ratios(listed.get(name, config.ratio), config.steps)[step] for name in layers}
        if config.scope == "global":  # the layers not listed share one threshold; pruned zeros count as the smallest
            free = {name: getattr(module, attribute_of(name)) for name, module in layers.items() if name not in listed}
            if free:
                ratios.update(global_ratios(free, step_ratios(config.ratio, config.steps)[step], config.floor))
        for name, module in layers.items():
            attribute = attribute_of(name)
            weight = getattr(module, attribute)
            if parametrize.is_parametrized(module, attribute):
                # Pruned weights read as exactly zero, so they stay among the smallest and stay pruned.
                module.parametrizations[attribute][0].mask.copy_(magnitude_mask(weight, ratios[name]))
            else:
                parametrize.register_parametrization(module, attribute, WeightMask(magnitude_mask(weight, ratios[name])))
                ctx.encodings[name] = ctx.encodings.get(name, TensorEncoding()).model_copy(update={"sparse": True})
        _between_steps(model, step, config.steps, ctx)


def whole_width_layers(model: nn.Module, example_inputs: Inputs, candidates: list[nn.Module], split_layers: list[nn.Module]) -> list[nn.Module]:
    """Of ``candidates``, the layers whose output channels channel pruning keeps whole:

    - those Torch-Pruning's dependency graph couples to a LayerNorm: a transformer's embedding width;
    - those coupled to the input channels of a Linear split into heads (the tokens attention reads: hand-written
      attention often takes its head size from their width);
    - a grouped convolution reading the model's input (a stem made depthwise by separable substitution): its
      channels are the image's, which no pruning can remove.
    """
    kept: list[nn.Module] = []
    if any(isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 for layer in candidates):
        readers = input_readers(model, example_inputs)
        kept += [layer for layer in candidates if layer in readers and layer.groups > 1]
    if not split_layers and not any(isinstance(module, nn.LayerNorm) for module in model.modules()):
        return kept  # no width to keep whole: no second dependency graph (the pruner builds its own)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=all_outputs)
    for layer in candidates:
        if layer not in graph.module2node:
            continue  # read by its parent, not called (nn.MultiheadAttention's out_proj): pruned with its parent or not at all
        prune_out = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_out, idxs=[0])
        if any(isinstance(dependency.target.module, nn.LayerNorm) or feeds_heads(graph, dependency, split_layers) for dependency, _ in group):
            kept.append(layer)
    return kept


def feeds_heads(graph: tp.DependencyGraph, dependency, split_layers: list[nn.Module]) -> bool:
    """Whether ``dependency`` prunes the input channels of a Linear split into heads."""
    target = dependency.target.module
    return target in split_layers and dependency.handler == graph.get_pruner_of_module(target).prune_in_channels


@torch.no_grad()
def input_readers(model: nn.Module, example_inputs: Inputs) -> set[nn.Module]:
    """The layers whose input is one of the model's input tensors itself."""
    given = {id(tensor) for tensor in tensors(example_inputs)}
    readers: set[nn.Module] = set()
    hooks = [
        module.register_forward_pre_hook(lambda module, args: readers.add(module) if args and id(args[0]) in given else None)
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        all_outputs(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return readers


# Torch-Pruning warns of parameters outside any layer (a transformer's position embedding), which it would prune
# along their last axis: they are part of the embedding width, which channel pruning keeps.
warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)


def prune_channels(model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> dict[str, int]:
    """Remove channels (and heads, by ``head_ratio``); returns the head attributes set (``PruningConfig.heads``)."""
    protected = [module for name, module in model.named_modules() if name in ctx.protected_modules]
    modules = dict(model.named_modules())
    listed = {modules[module_of(name)]: ratio for name, ratio in listed_ratios(compressible_weights(model), config).items()}
    splits = find_head_splits(model, ctx.example_inputs)
    check_heads(model, config, splits)
    split_layers = [modules[name] for name in splits]
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)) and m not in protected]
    # the embedding width (coupled to a LayerNorm), the widths attention reads, and the model's input channels stay whole
    kept = whole_width_layers(model, ctx.example_inputs, layers, split_layers)
    if config.scope == "layer":
        listed.update(keep_one_channel(layers, listed, config.ratio))
        listed.update(rounded_ratios(layers, listed, config.ratio, config.round_to))
    importance = tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2)
    heads = prune_heads(model, config, ctx, splits, importance, ignored=protected + kept) if config.head_ratio > 0 else {}
    pruner = tp.pruner.BasePruner(
        model,
        ctx.example_inputs,
        importance=importance,
        pruning_ratio=config.ratio,
        pruning_ratio_dict=listed or None,
        # Torch-Pruning's global ranking: one threshold over every layer's normalised channel importances
        global_pruning=config.scope == "global",
        max_pruning_ratio=1.0 - config.floor if config.scope == "global" else 1.0,
        iterative_steps=config.steps,
        # heads go whole (above) or not at all
        ignored_layers=protected + kept + split_layers,
        forward_fn=all_outputs,  # every exit of an early-exit model, so its heads are pruned consistently
        out_channel_groups={},  # Torch-Pruning's defaults are dicts shared between pruners, which it fills in
        in_channel_groups={},
    )
    if config.scope == "global" and not (pruner.out_channel_groups or pruner.in_channel_groups):
        prune_channels_globally(pruner, model, config, ctx, listed)
        return heads
    for step in range(config.steps):  # scope: layer, or grouped convolutions under global scope (Torch-Pruning's own ranking)
        pruner.step()
        _between_steps(model, step, config.steps, ctx)
    return heads


def prune_channels_globally(pruner: tp.pruner.BasePruner, model: nn.Module, config: PruningConfig, ctx: CompressionContext, listed: dict[nn.Module, float]) -> None:
    """One threshold over every layer's normalised channel importances (Torch-Pruning's global ranking), with each
    layer keeping at least ``floor`` of its channels, and at least one.

    Torch-Pruning's own global step leaves a layer whole where the threshold takes all of its channels, and its
    ``max_pruning_ratio`` holds only between steps: at 0.9 in one step LeNet-5's conv2 kept all 50 channels
    while fc1 lost 89% of its neurons; at 0.97 conv1 and conv2 both stayed whole. Here Torch-Pruning groups the
    coupled layers, scores and removes the channels; the threshold and the cap are netshrink's. Each step
    reaches ``ratio x (step + 1) / steps`` of the channels, Torch-Pruning's linear schedule (as with ``scope: layer``);
    layers in ``layer_ratios`` follow their own ratio on the same schedule, keeping at least one channel.
    """
    initial: dict[nn.Module, int] = {}
    for step in range(config.steps):
        share = (step + 1) / config.steps
        ranked, removals = [], {}
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
            importance = pruner.estimate_importance(group)
            if importance is None:
                continue
            layer, handler = group[0].dep.target.module, group[0].dep.handler
            initial.setdefault(layer, len(importance))
            if layer in listed:
                removals[layer] = (handler, importance, min(len(importance) - int(initial[layer] * (1 - listed[layer] * share)), len(importance) - 1))
            else:
                ranked.append((layer, handler, importance))
        scores = torch.cat([importance for _, _, importance in ranked]) if ranked else torch.zeros(0)
        drop = len(scores) - int(sum(initial[layer] for layer, _, _ in ranked) * (1 - config.ratio * share))
        if drop > 0:
            threshold = scores.kthvalue(drop).values
            for layer, handler, importance in ranked:
                least = max(1, math.ceil(config.floor * initial[layer]))
                removals[layer] = (handler, importance, min(int((importance <= threshold).sum()), len(importance) - least))
        for layer, (handler, importance, count) in removals.items():
            group = pruner.DG.get_pruning_group(layer, handler, torch.argsort(importance)[:count].tolist()) if count > 0 else None
            if group is not None and pruner.DG.check_pruning_group(group):
                group.prune()
        _between_steps(model, step, config.steps, ctx)


ROUNDING_TOLERANCE = 0.2  # the most that rounding to a block moves a layer's channel count, as a share of it


def rounded_kept(kept: int, channels: int, round_to: int) -> int:
    """``kept`` rounded to the nearest multiple of ``round_to`` (at least one multiple), for a layer of at least twice
    ``round_to`` channels, where that moves the count by at most ``ROUNDING_TOLERANCE`` of it; a smaller layer, a count
    under half a multiple (a ratio near 1), or one the block would move further (LeNet-5's conv1 at 0.75: 5 to 8) stays."""
    if round_to <= 1 or channels < 2 * round_to or 2 * kept < round_to:
        return kept
    rounded = min(channels, max(round_to, round(kept / round_to) * round_to))
    return rounded if abs(rounded - kept) <= ROUNDING_TOLERANCE * kept + 1e-9 else kept


def rounded_ratios(layers: list[nn.Module], listed: dict[nn.Module, float], ratio: float, round_to: int) -> dict[nn.Module, float]:
    """Per layer, the ratio under which Torch-Pruning keeps a multiple of ``round_to`` channels (``rounded_kept``); it
    keeps ``int(channels x (1 - ratio))``, so the ratio aims half a channel above the count wanted."""
    rounded = {}
    for layer in layers:
        channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if channels is None or round_to <= 1 or channels < 2 * round_to:
            continue
        kept = rounded_kept(int(channels * (1 - listed.get(layer, ratio))), channels, round_to)
        rounded[layer] = min(max(1 - (kept + 0.5) / channels, 0.0), 1 - 1e-6)
    return rounded


def keep_one_channel(layers: list[nn.Module], listed: dict[nn.Module, float], ratio: float) -> dict[nn.Module, float]:
    """Ratios capped so that each layer keeps one channel: the layers whose ratio would leave none.

    Torch-Pruning keeps ``int(channels x (1 - ratio))`` of a layer, and where that is 0 it prunes nothing
    there at all: at 0.97 LeNet-5's conv1 (20 channels) stayed whole, and the model ran 2.8x slower than at
    0.95. Capped just under ``(channels - 1) / channels``, the layer keeps its most important channel.
    """
    capped = {}
    for layer in layers:
        channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        wanted = listed.get(layer, ratio)
        if channels is not None and channels > 1 and int(channels * (1 - wanted)) < 1:
            capped[layer] = (channels - 1) / channels - 1e-6
    return capped


def prune_heads(model: nn.Module, config: PruningConfig, ctx: CompressionContext, splits: dict[str, HeadSplit], importance, ignored: list[nn.Module]) -> dict[str, int]:
    """Remove ``head_ratio`` of each attention module's heads (whole heads, the same from q, k, v and the output
    projection), in one step before the widths, and set the attributes its forward pass reshapes by; returns them.

    Per layer and in one step, because Torch-Pruning's own iterative and global head pruning can take a layer's
    last head (iteratively it applies each step's ratio to the heads left, so 0.75 over 3 steps removes all 4):
    here each layer keeps at least one head.
    """
    layers = {model.get_submodule(name): split for name, split in splits.items()}
    pruner = tp.pruner.BasePruner(
        model,
        ctx.example_inputs,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict={layer: 0.5 for layer in layers},  # only a pruned width lets Torch-Pruning remove heads; head dims stay
        ignored_layers=ignored,
        num_heads={layer: split.heads for layer, split in layers.items()},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=config.head_ratio,
        head_pruning_ratio_dict={layer: min(config.head_ratio, (split.heads - 1) / split.heads) for layer, split in layers.items()},
        forward_fn=all_outputs,
        out_channel_groups={},
        in_channel_groups={},
    )
    pruner.step()
    values: dict[str, int] = {}
    for layer, split in layers.items():
        values.update(head_attributes(model, split, pruner.num_heads[layer]))
    values.update(config_heads(model, splits, {split.layer: pruner.num_heads[layer] for layer, split in layers.items()}))
    set_attributes(model, values, "pruning.heads")
    # the forward pass must now split each layer into the heads left, of the same size as before
    try:
        after = find_head_splits(model, ctx.example_inputs, least=1)
        wrong = [name for name, layer in zip(splits, layers) if (after[name].heads, after[name].head_dim) != (pruner.num_heads[layer], splits[name].head_dim)]
        failure = f"it splits {wrong[0]} into {after[wrong[0]].heads} heads of {after[wrong[0]].head_dim}" if wrong else None
    except Exception as error:  # the model's own forward pass, reshaping by something netshrink did not find
        wrong, failure = list(splits), f"its forward pass fails ({type(error).__name__}: {str(error)[:200]})"
    if failure:
        owner = splits[wrong[0]].owner
        raise ValueError(
            f"pruning.head_ratio: heads were found in {owner!r} (its {', '.join(name for name in splits if splits[name].owner == owner)} outputs "
            f"are reshaped into heads), but with heads removed {failure}: it reshapes by a head count netshrink did not find (an int "
            "attribute whose name mentions heads, beside a fixed head size); set head_ratio to 0, or keep the head count in such an attribute"
        )
    return values


def check_heads(model: nn.Module, config: PruningConfig, splits: dict[str, HeadSplit]) -> None:
    """``head_ratio`` needs attention whose heads can go whole; ``ValueError`` naming what stands in the way."""
    if config.head_ratio <= 0:
        return
    others = [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    if others:
        raise ValueError(
            f"pruning.head_ratio: {others[0]!r} is a torch.nn.MultiheadAttention, whose heads Torch-Pruning cannot remove; "
            "set head_ratio to 0 (ratio still prunes the MLPs), or write the attention with Linears whose outputs are reshaped into heads"
        )
    if not splits:
        raise ValueError("pruning.head_ratio: this model has no attention whose heads can go whole (a Linear whose output the forward pass reshapes into heads); set head_ratio to 0")


class Pruning(Technique):
    summary = "pruning: weights (unstructured, stored sparse: smaller) or whole channels and heads (structured, Torch-Pruning's dependency graph: smaller and faster)"
    config_type: ClassVar[type[TechniqueConfig]] = PruningConfig
    stage: ClassVar[Stage] = Stage.PRUNING
    default_space: ClassVar[dict[str, Any]] = {
        "granularity": ["weight", "channel"],
        "ratio": {"low": 0.2, "high": 0.97},  # weight pruning at 0.95 (global) is a winner; channel pruning past 0.8 is not
        "steps": {"low": 1, "high": 3},
        "importance": ["l1", "l2"],
        "scope": ["layer", "global"],
    }
    # knobs that only mean something for some values of an earlier knob: asked only then
    conditions: ClassVar[dict[str, dict[str, Any]]] = {
        "importance": {"granularity": "channel"},
        "floor": {"scope": "global"},
        "head_ratio": {"granularity": "channel"},
    }

    def fine_tune_rounds(self, config: PruningConfig) -> int:
        """Fine-tunings this technique runs itself: one between each two of its steps."""
        return config.steps - 1

    def reshapes(self, config: PruningConfig) -> bool:
        """Channel pruning removes channels: the stored layers are narrower than the model's factory builds them."""
        return config.granularity == "channel"

    def apply(self, model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> None:
        before = layer_sizes(model, config.granularity)
        heads = prune_weights(model, config, ctx) if config.granularity == "weight" else prune_channels(model, config, ctx)
        after = layer_sizes(model, config.granularity)
        removed = {name: size - after.get(name, 0) for name, size in before.items() if size != after.get(name, 0)}
        if config.removed is not None and config.removed != removed:
            layer = next(name for name in sorted(set(removed) | set(config.removed)) if removed.get(name) != config.removed.get(name))
            raise ValueError(
                f"pruning.removed: the recipe removed {config.removed.get(layer, 0)} from {layer!r} and this replay {removed.get(layer, 0)}: "
                "the model or its weights differ from the ones the recipe was written on"
            )
        ctx.decided[self.kind] = {"heads": heads or {}, "removed": removed}

    def record(self, model: nn.Module, config: PruningConfig, ctx: CompressionContext) -> PruningConfig:
        """What went, per layer (``removed``), and the head attributes channel pruning set (``heads``, empty when no heads were removed)."""
        return config.model_copy(update=ctx.decided.get(self.kind, {"heads": {}, "removed": {}}))

    def rebuild(self, model: nn.Module, config: PruningConfig) -> None:
        """Removed heads: the attention modules get the head counts the recipe recorded (the tensors are resized on load)."""
        set_attributes(model, config.heads or {}, "pruning.heads")
