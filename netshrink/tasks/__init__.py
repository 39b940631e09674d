"""Tasks: a dataset plus a model, built-in or the user's own via ``module:factory``.

A ``module:factory`` reference imports the user's module and runs the factory:
it executes the user's code, like any Python import.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .datasets import TaskData, digits
from .models import lenet5

BUILTIN_DATASETS: dict[str, Callable[..., TaskData]] = {"digits": digits}
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": lenet5}


def resolve_factory(reference: str, builtins: dict[str, Callable[..., Any]], search_path: str | None = None) -> Callable[..., Any]:
    """A built-in name, or ``package.module:function`` imported from the Python path (plus ``search_path``)."""
    if reference in builtins:
        return builtins[reference]
    if ":" not in reference:
        raise ValueError(
            f"{reference!r} is neither a built-in ({', '.join(sorted(builtins))}) nor a 'module:factory' reference"
        )
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{reference!r} must look like 'package.module:factory'")
    if search_path and search_path not in sys.path:
        sys.path.insert(0, search_path)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import failure of user code is a config problem
        raise ValueError(f"cannot import module {module_name!r} from {reference!r}: {type(error).__name__}: {error}") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise ValueError(f"{reference!r} is not callable")
    return factory


def load_data(reference: str, args: dict[str, Any], search_path: str | None = None) -> TaskData:
    """Build the splits. A user factory returns a ``TaskData`` or a ``(train, val, test)`` tuple of datasets."""
    produced = resolve_factory(reference, BUILTIN_DATASETS, search_path)(**args)
    if isinstance(produced, TaskData):
        return produced
    if not (isinstance(produced, (tuple, list)) and len(produced) == 3 and all(isinstance(d, Dataset) for d in produced)):
        raise ValueError(f"dataset factory {reference!r} must return TaskData or (train, val, test) torch datasets")
    train, val, test = produced
    sample, _ = train[0]
    labels = [int(train[i][1]) for i in range(len(train))]
    return TaskData(train=train, val=val, test=test, num_classes=max(labels) + 1, input_shape=tuple(sample.shape))


def build_model(reference: str, args: dict[str, Any], data: TaskData, search_path: str | None = None) -> nn.Module:
    """Instantiate the model. ``num_classes`` and ``input_shape`` are passed when the factory takes them."""
    factory = resolve_factory(reference, BUILTIN_MODELS, search_path)
    if factory is lenet5:
        defaults = {"num_classes": data.num_classes, "in_channels": data.input_shape[0], "image_size": data.input_shape[-1]}
    else:
        accepted = inspect.signature(factory).parameters
        defaults = {
            key: value
            for key, value in {"num_classes": data.num_classes, "input_shape": data.input_shape}.items()
            if key in accepted
        }
    model = factory(**{**defaults, **args})
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def example_inputs(data: TaskData, batch: int = 1) -> torch.Tensor:
    return torch.zeros((batch, *data.input_shape))


__all__ = ["TaskData", "build_model", "example_inputs", "load_data", "resolve_factory"]
