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

from netshrink.integrity import file_sha256  # noqa: F401  (part of this module's interface)

from .batches import BatchFormat, map_tensors
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


def load_data(
    reference: str, args: dict[str, Any], search_path: str | None = None, batch_format: Callable[[Dataset], BatchFormat] = BatchFormat.resolve
) -> TaskData:
    """Build the splits. A user factory returns a ``TaskData`` or a ``(train, val, test)`` tuple of datasets, whose
    items ``batch_format(train)`` reads (default: the format its first item shows)."""
    produced = resolve_factory(reference, BUILTIN_DATASETS, search_path)(**args)
    if isinstance(produced, TaskData):
        return produced
    if not (isinstance(produced, (tuple, list)) and len(produced) == 3 and all(isinstance(d, Dataset) for d in produced)):
        raise ValueError(f"dataset factory {reference!r} must return TaskData or (train, val, test) torch datasets")
    train, val, test = produced
    batches = batch_format(train)
    inputs = batches.example(train)
    shapes = map_tensors(inputs, lambda tensor: tuple(tensor.shape[1:]))
    return TaskData(train=train, val=val, test=test, num_classes=class_count(train, batches), input_shape=shapes)  # type: ignore[arg-type]


def class_count(dataset: Dataset, batches: BatchFormat) -> int | None:
    """1 + the largest integer class label of ``dataset`` (one pass over it), or None where targets are not class labels."""
    largest = -1
    for _, target in batches.batches(dataset, 512):
        if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dim() != 1:
            return None
        if len(target):
            largest = max(largest, int(target.max()))
    return largest + 1 if largest >= 0 else None


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
            if key in accepted and value is not None
        }
    model = factory(**{**defaults, **args})
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {reference!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def weights_path(weights: str, search_path: str | None) -> Path:
    """``task.weights`` as a path: a relative one is taken from the experiment file's folder."""
    path = Path(weights).expanduser()
    return path if path.is_absolute() or search_path is None else Path(search_path) / path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``.pt``/``.pth``, loaded with ``weights_only``)."""
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors' own error types
            raise ValueError(f"{path}: not a readable .safetensors file ({type(error).__name__}: {error})") from None
    if path.suffix not in (".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: give a .pt/.pth file written by torch.save(model.state_dict(), ...) or a .safetensors file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: torch.load cannot read it as a state dict ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict (save model.state_dict())")
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the state dict at ``path`` into ``model``; ``ValueError`` naming the first missing or unexpected key, or
    the first layer whose shape differs, with both shapes."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing:
        raise ValueError(f"{path} does not fit the model: key {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{path} does not fit the model: key {unexpected[0]!r} is unexpected ({len(unexpected)} unexpected in all)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{path} does not fit the model: {key!r} has shape {tuple(value.shape)} in the file and {tuple(own[key].shape)} in the model")
    model.load_state_dict(state)



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


__all__ = ["BatchFormat", "TaskData", "build_model", "dataset_digest", "factory_sources", "load_data", "load_weights", "resolve_factory"]
