"""Recognising attention in a user's model, for the techniques that must treat it specially.

Heads are found by what the forward pass does, not by attribute names: a Linear whose output
the model reshapes into ``(..., heads, head_dim)`` (or ``(..., 3, heads, head_dim)``, q, k and v
from one ``qkv``) splits its output channels into heads. That covers attention written as timm
writes it (``qkv`` reshaped by ``num_heads``), Hugging Face's (``query``/``key``/``value`` viewed as
``(-1, attention_head_size)``) and hand-written blocks that keep their head count under any name.
Such a Linear's output channels are pruned only as whole heads (channel pruning's ``head_ratio``),
and the token width it reads stays whole (hand-written attention often derives the head size
from it).

The head count a forward pass reshapes by lives on the attention module: an int attribute whose
name mentions heads (``num_heads``, ``heads``, ``num_attention_heads``), and sometimes the width of
all heads (``all_head_size``). Removing heads sets them (``head_attributes``), and the model is run
once more to check that its forward pass agrees.

PyTorch's own ``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer``) is recognised by
type: its ``in_proj_weight`` is a Parameter, not a Linear, so quantization and clustering reach it
by name; Torch-Pruning cannot remove its heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .inputs import Inputs, call


@dataclass(frozen=True)
class HeadSplit:
    """A Linear whose output channels the forward pass splits into heads."""

    layer: str  # the Linear
    heads: int
    head_dim: int
    packed: int  # 3 when q, k and v come out of this one Linear, else 1
    owner: str  # the attention module: the nearest module above ``layer`` that keeps the head count (else its parent)


_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}


class _ReshapeWatch(TorchFunctionMode):
    """Records, for each tagged tensor (a Linear's output), how a reshape splits its last axis."""

    def __init__(self, tagged: dict[int, str]) -> None:
        super().__init__()
        self.tagged = tagged
        self.splits: dict[str, tuple[int, ...]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in _RESHAPES and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.tagged and isinstance(result, torch.Tensor):
            before, after = tuple(args[0].shape), tuple(result.shape)
            lead = len(before) - 1
            if len(after) > len(before) and after[:lead] == before[:lead]:
                split = after[lead:]
                if math.prod(split) == before[-1] and len(split) >= 2:
                    self.splits.setdefault(self.tagged[id(args[0])], split)
        return result


@torch.no_grad()
def find_head_splits(model: nn.Module, inputs: Inputs, least: int = 2) -> dict[str, HeadSplit]:
    """The Linears of ``model`` whose outputs one forward pass on ``inputs`` splits into ``least`` heads or more, by layer name."""
    tagged: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # the tagged outputs, kept alive so that their ids stay theirs

    def tag(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                tagged[id(output)] = name
                alive.append(output)

        return hook

    hooks = [module.register_forward_hook(tag(name)) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    watch = _ReshapeWatch(tagged)
    was_training = model.training
    try:
        with watch:
            call(model.eval(), inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    found = {}
    for layer, split in watch.splits.items():
        heads, head_dim, packed = split[-2], split[-1], math.prod(split[:-2])
        if heads < least:
            continue
        found[layer] = HeadSplit(layer, heads, head_dim, packed, _owner(model, layer, heads))
    return found


def _owner(model: nn.Module, layer: str, heads: int) -> str:
    """The nearest module above ``layer`` with an int attribute naming heads and equal to ``heads``; else ``layer``'s parent."""
    parts = layer.split(".")
    for length in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:length])
        if any(value == heads and not any(word in key.lower() for word in _SIZE_WORDS) for key, value in _head_ints(model.get_submodule(name)).items()):
            return name
    return ".".join(parts[:-1])


_SIZE_WORDS = ("dim", "size", "width")


def _head_ints(module: nn.Module) -> dict[str, int]:
    return {key: value for key, value in vars(module).items() if "head" in key.lower() and isinstance(value, int) and not isinstance(value, bool)}


def head_attributes(model: nn.Module, split: HeadSplit, heads_left: int) -> dict[str, int]:
    """The owner's attributes to set once ``split`` keeps ``heads_left`` heads, by dotted path: those equal to the head
    count become ``heads_left``, those equal to the width of all heads (``all_head_size``) ``heads_left x head_dim``."""
    owner = model.get_submodule(split.owner)
    prefix = f"{split.owner}." if split.owner else ""
    values = {}
    for key, value in _head_ints(owner).items():
        size = any(word in key.lower() for word in _SIZE_WORDS)  # head_dim, attention_head_size: kept, heads go whole
        if value == split.heads and not size:
            values[prefix + key] = heads_left
        elif value == split.heads * split.head_dim and split.head_dim > 1:
            values[prefix + key] = heads_left * split.head_dim
    return values


def set_attributes(model: nn.Module, values: dict[str, int], field: str) -> None:
    """Set each dotted path of ``values`` (a module's attribute, or a Hugging Face model's ``config.num_attention_heads``);
    ``ValueError`` naming ``field`` when the path leads nowhere."""
    for path, value in values.items():
        owner_path, _, attribute = path.rpartition(".")
        owner = model
        for part in owner_path.split(".") if owner_path else []:
            owner = getattr(owner, part, None)
            if owner is None:
                raise ValueError(f"{field}: the recipe sets {path!r}, and this model has no {owner_path!r}")
        if not hasattr(owner, attribute):
            raise ValueError(f"{field}: the recipe sets {path!r}, and {owner_path or 'the model'!r} has no attribute {attribute!r}")
        setattr(owner, attribute, value)


def config_heads(model: nn.Module, splits: dict[str, HeadSplit], heads_left: dict[str, int]) -> dict[str, int]:
    """``config.num_attention_heads`` of a Hugging Face model whose attention layers all kept the same count (its config
    holds one count for every layer), so that the config says what the pruned model is; else nothing."""
    config = getattr(model, "config", None)
    counts = set(heads_left.values())
    originals = {split.heads for split in splits.values()}
    if config is None or len(counts) != 1 or getattr(config, "num_attention_heads", None) not in originals:
        return {}
    return {"config.num_attention_heads": counts.pop()}


def qkv_output(module: nn.Module) -> nn.Linear | None:
    """The Linear whose output is ``module``'s q, k and v, if ``module`` is attention as timm writes it."""
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Sequential) and len(qkv) and isinstance(qkv[-1], nn.Linear):
        qkv = qkv[-1]  # factored by low-rank: the second factor produces q, k and v
    return qkv if isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int) else None


def is_attention(module: nn.Module) -> bool:
    """Attention that early exits' tracer keeps as one layer: timm-style, or PyTorch's own."""
    return qkv_output(module) is not None or isinstance(module, nn.MultiheadAttention)


def normalises_last_axis(model: nn.Module, width: int) -> bool:
    """Whether a LayerNorm of ``model`` normalises a last axis of ``width``: tokens of that width, a transformer's."""
    return any(isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (width,) for m in model.modules())
