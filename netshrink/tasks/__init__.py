"""Tasks: a dataset plus a model, built-in or the user's own via ``module:factory``.

A ``module:factory`` reference imports the user's module and runs the factory:
it executes the user's code, like any Python import. It may name only the
user's own code: a module of the Python standard library or one built into the
interpreter is refused (``os:system`` with ``dataset_args: {command: ...}``
would otherwise run a shell command), and so is a factory such a module defines
(``mymodule:system`` after ``from os import system``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .datasets import TaskData, dataset_digest, digits
from .models import lenet5, vit

BUILTIN_DATASETS: dict[str, Callable[..., TaskData]] = {"digits": digits}
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": lenet5, "vit": vit}


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
    if is_standard_module(module_name):
        raise ValueError(f"{reference!r}: {PYTHON_OWN_RULE}, and {module_name!r} is part of Python")
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
    defined_in = getattr(inspect.unwrap(factory.func if isinstance(factory, functools.partial) else factory), "__module__", None) or ""
    if is_standard_module(defined_in):
        raise ValueError(f"{reference!r}: {PYTHON_OWN_RULE}, and {attribute!r} comes from Python's own {defined_in!r}")
    return factory


PYTHON_OWN_RULE = "a 'module:factory' reference must name your own code, not a module of the Python standard library or of the interpreter's builtins"


def is_standard_module(module_name: str) -> bool:
    """Whether ``module_name`` belongs to the standard library or is built into the interpreter (``os.path``, ``builtins``, ``_io``)."""
    top = module_name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


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
    if factory in BUILTIN_MODELS.values():
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




def factory_sources(reference: str, builtins: dict[str, Callable[..., Any]], search_path: str | None = None) -> dict[str, str]:
    """SHA-256 of the source of the code behind a factory, by module name.

    That is the factory's own module, and every module imported so far from the
    same place: the same top-level package, or for a single-file module the same
    folder (so a ``layers.py`` that ``model.py`` imports counts too). A built-in
    factory counts its own module only; netshrink's version covers the rest.
    """
    factory = resolve_factory(reference, builtins, search_path)
    own = getattr(inspect.unwrap(factory.func if isinstance(factory, functools.partial) else factory), "__module__", None)
    module = sys.modules.get(own or "")
    if module is None or not getattr(module, "__file__", None):
        return {}
    files = {own: Path(module.__file__).resolve()}
    top = sys.modules.get(own.partition(".")[0])
    if reference not in builtins and top is not None and getattr(top, "__file__", None):
        root = Path(top.__file__).resolve().parent
        if root.name not in ("site-packages", "dist-packages"):  # a lone module installed there: its own file only
            for name, other in list(sys.modules.items()):
                path = getattr(other, "__file__", None)
                if path and path.endswith(".py") and Path(path).resolve().is_relative_to(root):
                    files[name] = Path(path).resolve()
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sorted(files.items()) if path.is_file()}


__all__ = ["TaskData", "build_model", "dataset_digest", "example_inputs", "factory_sources", "load_data", "resolve_factory"]
