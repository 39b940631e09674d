"""Early exits between the blocks of a model that torch.fx cannot trace (Hugging Face transformers).

A Hugging Face encoder (``BertForSequenceClassification``, ``ViTForImageClassification``) keeps its
layers in one ``nn.ModuleList`` that its forward pass runs in order, each layer taking the hidden
states of the one before (``bert.encoder.layer``, ``vit.encoder.layer``), but its forward pass has
Python control flow that torch.fx cannot trace, so it cannot be cut into segments. Here the model
stays whole: forward hooks on the chosen blocks hand their output (the hidden states, or the first
element of the tuple a block returns) to exit heads, which classify the first token (``cls``: what
BERT's pooler and ViT's classifier read) or the mean token.

The model runs to the end in torch (every exit's logits are computed, and each sample takes the
first confident one); the ONNX export (``netshrink.deploy.onnx_export.block_exit_graph``) cuts the
exported graph after each exit, so ONNX Runtime skips the rest of the network when the exit is
confident. The stack is found by what the model is: the longest ``nn.ModuleList`` of modules of one
type, each of which runs once per forward pass, in order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import ExitLogits, Inputs, call, logits_of


def block_stacks(model: nn.Module) -> dict[str, int]:
    """``nn.ModuleList`` s of two or more modules of one type, by name, with their length; longest first."""
    found = {
        name: len(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(block) for block in module}) == 1
    }
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def stack_cut_points(model: nn.Module) -> list[str]:
    """Names usable as ``after``: every block of the longest stack but its last (an exit there would be the final one)."""
    stacks = block_stacks(model)
    if not stacks:
        return []
    stack, length = next(iter(stacks.items()))
    return [f"{stack}.{index}" for index in range(length - 1)]


def hidden_states(output: Any) -> torch.Tensor:
    """A block's hidden states: its output, or the first element of the tuple it returns."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"early exits read a block's hidden states, and this block returned {type(output).__name__}")
    return output


class TokenHead(nn.Module):
    """An exit head on (batch, tokens, width) hidden states: the first token (``cls``) or the mean token, then one Linear."""

    def __init__(self, width: int, num_classes: int, pooling: str = "cls") -> None:
        super().__init__()
        self.linear = nn.Linear(width, num_classes)
        self.pooling = pooling

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)
        return self.linear(pooled)


class BlockExitNet(nn.Module):
    """``model`` with exit heads after some blocks of its block stack, attached by forward hooks.

    In training mode ``forward`` returns every exit's logits (``ExitLogits``, the final exit last), so the loss sums
    over them. In eval mode each sample takes the logits of the first exit whose top softmax probability reaches
    ``threshold`` (the final one otherwise): the answers the exported ONNX model gives sample by sample.
    """

    def __init__(self, model: nn.Module, cut_names: tuple[str, ...], heads: list[TokenHead], threshold: float) -> None:
        super().__init__()
        if len(cut_names) != len(heads):
            raise ValueError(f"need one exit head per cut point, got {len(cut_names)} cut points and {len(heads)} heads")
        self.model = model
        self.heads = nn.ModuleList(heads)
        self.cut_names = cut_names
        self.threshold = threshold

    def all_outputs(self, inputs: Inputs) -> ExitLogits:
        """Every exit's logits, the final exit's last."""
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            self.model.get_submodule(name).register_forward_hook(lambda _m, _i, output, index=index: captured.__setitem__(index, hidden_states(output)))
            for index, name in enumerate(self.cut_names)
        ]
        try:
            final = logits_of(call(self.model, inputs))
        finally:
            for hook in hooks:
                hook.remove()
        return ExitLogits([head(captured[index]) for index, head in enumerate(self.heads)] + [final])

    def exit_forward(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the index of the exit each sample left at (``len(heads)`` = the final one)."""
        outputs = self.all_outputs(inputs)
        logits = outputs[-1].clone()
        exits = torch.full((logits.shape[0],), len(self.heads), dtype=torch.long, device=logits.device)
        undecided = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        for index, exit_logits in enumerate(outputs[:-1]):
            leave = undecided & (F.softmax(exit_logits, dim=1).amax(dim=1) >= self.threshold)
            logits[leave] = exit_logits[leave]
            exits[leave] = index
            undecided &= ~leave
        return logits, exits

    def forward(self, *args, **kwargs):
        inputs: Inputs = kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))
        if self.training:
            return self.all_outputs(inputs)
        return self.exit_forward(inputs)[0]
