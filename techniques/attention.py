"""Recognising attention in a user's model, for the techniques that must treat it specially.

Two kinds are recognised:

- attention written as timm writes it: a module with a ``qkv`` child (a Linear; or
  low-rank's pair of Linears, the second producing q, k and v) and an int ``num_heads``
  that its forward pass reshapes by. Its heads can go whole (channel pruning's
  ``head_ratio``), and early exits treat it as one layer.
- PyTorch's own ``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer``): its
  ``in_proj_weight`` is a Parameter, not a Linear, so quantization and clustering reach it
  by name; Torch-Pruning cannot remove its heads.
"""

from __future__ import annotations

from torch import nn


def qkv_output(module: nn.Module) -> nn.Linear | None:
    """The Linear whose output is ``module``'s q, k and v, if ``module`` is attention as timm writes it."""
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Sequential) and len(qkv) and isinstance(qkv[-1], nn.Linear):
        qkv = qkv[-1]  # factored by low-rank: the second factor produces q, k and v
    return qkv if isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int) else None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The timm-style attention modules of ``model``, by name."""
    return {name: module for name, module in model.named_modules() if qkv_output(module) is not None}


def is_attention(module: nn.Module) -> bool:
    return qkv_output(module) is not None or isinstance(module, nn.MultiheadAttention)


def normalises_last_axis(model: nn.Module, width: int) -> bool:
    """Whether a LayerNorm of ``model`` normalises a last axis of ``width``: tokens of that width, a transformer's."""
    return any(isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (width,) for m in model.modules())
