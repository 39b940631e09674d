"""Model inputs and outputs of any usual structure: one tensor, a tuple of tensors, or a dict of tensors.

A user's model may take ``model(x)``, ``model(ids, mask)`` or ``model(**batch)`` (as every
Hugging Face model does), and may return logits, a dict or a ``ModelOutput`` holding
``logits``, or a tuple whose first element is the logits. Every consumer in the pipeline
(training, evaluation, tracing for Torch-Pruning, calibration, ONNX export) goes through
these few functions, so a new input shape is one change here, not a hunt through ten modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import nn

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


class ExitLogits(tuple):
    """Every exit's logits of a model with early exits in training mode: the loss is summed over them (the final exit
    last). A tuple of another kind that a user's model returns is read as ``(logits, ...)``."""


class WidthLogits(tuple):
    """The logits of a slimmable network in training mode: the widest first, then the narrower widths of this batch.
    The loss trains the widest on the task and the others on its predictions (``base.summed_over_exits``)."""


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*inputs)`` or ``model(**inputs)``, as the structure says."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_layers(model: nn.Module, example_inputs: Inputs) -> frozenset[str]:
    """Names of the layers that produce the model's outputs (their output size is the class count)."""
    order: list[str] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.no_grad():
            call(model.eval(), example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return frozenset(order[-1:])


def logits_of(outputs: Any) -> Any:
    """The logits in a model's output: the tensor itself, ``outputs["logits"]`` / ``outputs.logits`` (a dict or a
    Hugging Face ``ModelOutput``), or the first element of a tuple. ``ExitLogits`` and ``WidthLogits`` pass through whole.
    ``TypeError`` naming what came back when none of these holds."""
    if isinstance(outputs, (torch.Tensor, ExitLogits, WidthLogits)):
        return outputs
    if isinstance(outputs, Mapping):
        if "logits" in outputs and isinstance(outputs["logits"], torch.Tensor):
            return outputs["logits"]
        raise TypeError(f"the model returned a {type(outputs).__name__} with keys {sorted(map(str, outputs))[:8]}, but no 'logits' tensor")
    if isinstance(outputs, (tuple, list)):
        if outputs and isinstance(outputs[0], torch.Tensor):
            return outputs[0]
        first = type(outputs[0]).__name__ if outputs else "nothing"
        raise TypeError(f"the model returned a {type(outputs).__name__} whose first element is {first}, not a tensor of logits")
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(outputs).__name__}; netshrink reads a tensor of logits, a dict or ModelOutput with 'logits', "
        "or a tuple whose first element is the logits"
    )


def forward_logits(model: nn.Module, inputs: Inputs) -> Any:
    return logits_of(call(model, inputs))


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs`` in order (a dict's in its key order)."""
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return list(inputs)
    return [inputs]


def input_names(inputs: Inputs) -> list[str]:
    """Names of the exported ONNX model's inputs: a dict's keys, ``input_0``, ``input_1``, ... for a tuple, ``input`` for one tensor."""
    if isinstance(inputs, Mapping):
        return [str(key) for key in inputs]
    if isinstance(inputs, (tuple, list)):
        return [f"input_{index}" for index in range(len(inputs))]
    return ["input"]


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor, its structure kept."""
    if isinstance(inputs, Mapping):
        return {key: fn(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(fn(value) for value in inputs)
    return fn(inputs)


def to_device(inputs: Inputs, device: str | torch.device) -> Inputs:
    return map_tensors(inputs, lambda tensor: tensor.to(device))


def batch_size(inputs: Inputs) -> int:
    return int(tensors(inputs)[0].shape[0])


def take(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of a batch."""
    return map_tensors(inputs, lambda tensor: tensor[start:stop])


def concat(batches: list[Inputs]) -> Inputs:
    """Batches of the same structure joined along the batch axis (equal per-sample shapes)."""
    first = batches[0]
    if isinstance(first, Mapping):
        return {key: torch.cat([batch[key] for batch in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.cat([batch[index] for batch in batches]) for index in range(len(first)))
    return torch.cat(batches)


def describe(inputs: Inputs) -> str:
    """``input_ids: int64 (2, 16), attention_mask: int64 (2, 16)``: the structure as messages name it."""
    return ", ".join(f"{name}: {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}" for name, tensor in zip(input_names(inputs), tensors(inputs)))


def numpy_feed(inputs: Inputs) -> dict[str, np.ndarray]:
    """``inputs`` as ONNX Runtime takes them: one array per input name (``input_names``), in its dtype."""
    return {name: np.ascontiguousarray(tensor.detach().cpu().numpy()) for name, tensor in zip(input_names(inputs), tensors(inputs))}
