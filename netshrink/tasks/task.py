"""The task as every consumer meets it: the splits, how to read their batches, the loss, the metric, the model.

One typed object (``Task``) carries "how to split a batch into model inputs and target, how to run
the model, how to score it" through the baseline, the trials, export and validation, in the manner
of NNI's ``TorchEvaluator`` and Hugging Face's ``Trainer`` (``compute_metrics``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from netshrink.config import TaskConfig
from netshrink.metrics import BUILTIN_METRICS, Metric, builtin_metric
from netshrink.techniques.base import LossFn, cross_entropy
from netshrink.techniques.inputs import Inputs

from . import BUILTIN_DATASETS, build_model, load_data, load_weights, resolve_factory, weights_path
from .batches import BatchFormat
from .datasets import TaskData

CALIBRATION_SAMPLES = 256  # training samples that calibrate static int8's activation ranges (ONNX Runtime's examples take a few hundred)


class TaskError(ValueError):
    """A part of the task that cannot be built or read: ``field`` names the experiment-file key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Task:
    config: TaskConfig
    data: TaskData
    batches: BatchFormat
    loss: LossFn
    metric: Metric
    search_path: str | None

    def build_model(self, weights: bool = False) -> nn.Module:
        """A fresh model from the factory; with ``weights``, ``task.weights`` loaded into it (the user's trained model)."""
        model = build_model(self.config.model, self.config.model_args, self.data, self.search_path)
        if weights and self.config.weights:
            load_weights(model, self.weights_file())
        return model

    def weights_file(self) -> Path | None:
        return weights_path(self.config.weights, self.search_path) if self.config.weights else None

    def example(self) -> Inputs:
        """One real validation sample's model inputs (batch 1), in their real dtypes: what tracing and export see."""
        return self.batches.example(self.data.val, 1)

    def calibration(self) -> Inputs | None:
        """The first ``CALIBRATION_SAMPLES`` training samples' inputs, the same for a trial's fine-tuning and any later
        export; None where they cannot be batched together (inputs whose length varies between samples)."""
        count = min(len(self.data.train), CALIBRATION_SAMPLES)  # type: ignore[arg-type]
        try:
            return self.batches.collated(self.data.train, list(range(count)))[0]
        except RuntimeError:
            return None

    def dynamic_axes(self) -> dict[str, list[int]]:
        """Input name -> the axes beyond the batch whose length varies between validation samples (sequence axes)."""
        return self.batches.varying_axes(self.data.val)


def load_task(config: TaskConfig, search_path: str | None, num_workers: int = 0) -> Task:
    """Build the task: ``TaskError`` naming the field for the first part that fails (``validation`` reports all of them)."""
    collate = resolve_function(config.collate, "task.collate", search_path) if config.collate else None
    try:
        resolve_factory(config.dataset, BUILTIN_DATASETS, search_path)  # an import problem is named as such, not as a failed build
    except ValueError as error:
        raise TaskError("task.dataset", str(error)) from None
    try:
        data = load_data(config.dataset, config.dataset_args, search_path, _format_factory(config, collate, num_workers))
    except TaskError:
        raise
    except Exception as error:  # user code or user arguments
        field = "task.dataset_args" if config.dataset_args else "task.dataset"  # name the arguments only where the user gave some
        hint = ""
        if isinstance(error, RuntimeError) and "equal size" in str(error) and not config.collate:  # torch's default collate
            field, hint = "task.dataset", "; samples of different lengths need a collate function that pads them (task.collate)"
        raise TaskError(field, f"building dataset {config.dataset!r} failed: {type(error).__name__}: {error}{hint}") from None
    batches = _format_factory(config, collate, num_workers)(data.train)
    return Task(
        config=config, data=data, batches=batches, loss=resolve_loss(config.loss, search_path), metric=resolve_metric(config.metric, search_path),
        search_path=search_path,
    )


def _format_factory(config: TaskConfig, collate, num_workers: int) -> Callable[[Any], BatchFormat]:
    def resolve(dataset) -> BatchFormat:
        try:
            return BatchFormat.resolve(dataset, config.label_key, collate, num_workers)
        except ValueError as error:
            field, _, message = str(error).partition(": ")
            raise TaskError(field if field.startswith("task.") else "task.dataset", message or str(error)) from None

    return resolve


def resolve_function(reference: str, field: str, search_path: str | None) -> Callable[..., Any]:
    try:
        return resolve_factory(reference, {}, search_path)
    except ValueError as error:
        raise TaskError(field, str(error)) from None


def resolve_loss(reference: str, search_path: str | None) -> LossFn:
    """``cross_entropy``, or the user's ``fn(outputs, target) -> scalar tensor`` (outputs: the logits)."""
    if reference == "cross_entropy":
        return cross_entropy
    fn = resolve_function(reference, "task.loss", search_path)

    def loss(logits, targets, _inputs) -> torch.Tensor:
        return fn(logits, targets)

    loss.__qualname__ = reference
    return loss


def resolve_metric(reference: str, search_path: str | None) -> Metric:
    if reference in BUILTIN_METRICS:
        return builtin_metric(reference)
    fn = resolve_function(reference, "task.metric", search_path)
    try:
        inspect.signature(fn).bind(None, None)
    except (TypeError, ValueError):
        raise TaskError("task.metric", f"{reference!r} must take two arguments (outputs, targets)") from None
    return Metric(name=reference.rpartition(":")[2], fn=fn, proportion=False)
