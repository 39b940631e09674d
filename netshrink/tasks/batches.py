"""How a task's batches are read: which part is the model's input and which the target, for every consumer.

A dataset item may be ``(inputs, target)``, with ``inputs`` a tensor, a tuple of tensors or
a dict of tensors, or a dict that holds the target under ``label_key`` (``labels``, else
``label``) next to the model's inputs, as Hugging Face pipelines yield. Items are collated
(the user's ``task.collate`` or torch's default) and then split, so a collate function that
pads, or returns a dict, is read the same way. Training, evaluation, calibration, the ONNX
export's example inputs and the latency feeds all ask a ``BatchFormat``; none unpacks
``(x, y)`` by hand (HF ``Trainer`` and Olive's ``input_cols``/``label_col`` keep the same habit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from netshrink.techniques.inputs import Inputs, input_names, map_tensors, numpy_feed, tensors


DEFAULT_LABEL_KEYS = ("labels", "label")  # Hugging Face's name first, then the datasets library's


class BatchError(ValueError):
    """A batch that cannot be split into inputs and target; the message names the field and what was found."""


@dataclass(frozen=True)
class BatchFormat:
    """Splits collated batches into (model inputs, target).

    ``label_key``: for items that are dicts, the key of the target (resolved by ``resolve``);
    None for ``(inputs, target)`` items. ``collate``: the user's collate function, or None
    for torch's default. ``num_workers``: data-loader worker processes.
    """

    label_key: str | None = None
    collate: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0

    @classmethod
    def resolve(cls, dataset: Dataset, label_key: str | None = None, collate: Callable | None = None, num_workers: int = 0) -> "BatchFormat":
        """The format of ``dataset``'s batches, from its first item: ``BatchError`` naming the rule when it fits none."""
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise BatchError("task.dataset: a split is empty")
        batch = (collate or default_collate)([dataset[0]])
        if isinstance(batch, Mapping):
            keys = [str(key) for key in batch]
            if label_key is None:
                label_key = next((key for key in DEFAULT_LABEL_KEYS if key in batch), None)
                if label_key is None:
                    raise BatchError(
                        f"task.label_key: batches are dicts with keys {keys}, and none is 'labels' or 'label'; "
                        "name the key that holds the target with task.label_key"
                    )
            elif label_key not in batch:
                raise BatchError(f"task.label_key: {label_key!r} is not a key of the batch; its keys: {keys}")
            if len(batch) < 2:
                raise BatchError(f"task.dataset: batches hold only {label_key!r}; the model's inputs must be other keys of the dict")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            if label_key is not None:
                raise BatchError(
                    f"task.label_key: {label_key!r} is set, but items are (inputs, target) pairs, not dicts; remove task.label_key"
                )
        else:
            raise BatchError(
                f"task.dataset: an item (after collation) is a {type(batch).__name__}"
                + (f" of {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
                + "; netshrink reads (inputs, target) pairs, with inputs a tensor, a tuple of tensors or a dict of tensors, "
                "or dicts holding the target under task.label_key (default 'labels', else 'label')"
            )
        format = cls(label_key=label_key, collate=collate, num_workers=num_workers)
        format.split(batch)  # the inputs' structure is checked too
        return format

    def split(self, batch: Any) -> tuple[Inputs, Any]:
        """(model inputs, target) of a collated batch."""
        if self.label_key is not None:
            if not isinstance(batch, Mapping) or self.label_key not in batch:
                found = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
                raise BatchError(f"task.label_key: {self.label_key!r} is not in the batch ({found})")
            inputs = {str(key): value for key, value in batch.items() if key != self.label_key}
            target = batch[self.label_key]
        else:
            inputs, target = batch
            if isinstance(inputs, list):
                inputs = tuple(inputs)  # torch's default collate turns a tuple of inputs into a list
        for name, value in zip(input_names(inputs), tensors(inputs)):
            if not isinstance(value, torch.Tensor):
                raise BatchError(f"task.dataset: model input {name!r} is a {type(value).__name__}, not a tensor")
        return inputs, target

    def loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=self.collate, num_workers=self.num_workers,
            persistent_workers=False,
        )

    def batches(self, dataset: Dataset, batch_size: int = 256, **options: Any) -> Iterator[tuple[Inputs, Any]]:
        for batch in self.loader(dataset, batch_size, **options):
            yield self.split(batch)

    def collated(self, dataset: Dataset, indices: list[int]) -> tuple[Inputs, Any]:
        """Items ``indices`` of ``dataset`` as one batch, split."""
        return self.split((self.collate or default_collate)([dataset[index] for index in indices]))

    def example(self, dataset: Dataset, count: int = 1) -> Inputs:
        """The first ``count`` samples' model inputs: real samples in their real dtypes, for tracing and export."""
        return self.collated(dataset, list(range(min(count, len(dataset)))))[0]  # type: ignore[arg-type]

    def feeds(self, dataset: Dataset, batch: int = 1, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """ONNX Runtime feeds of ``batch`` samples each (input name -> array, dtypes kept), over ``dataset`` in order."""
        count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
        feeds = []
        for start in range(0, count - batch + 1 if count >= batch else 1, batch):
            inputs, _ = self.collated(dataset, [index % len(dataset) for index in range(start, start + batch)])  # type: ignore[arg-type]
            feeds.append(numpy_feed(inputs))
        return feeds

    def varying_axes(self, dataset: Dataset, samples: int = 32) -> dict[str, list[int]]:
        """Per input name, the axes (of a batch) whose length differs between single samples: a sequence axis the
        exported model keeps dynamic. Read on the first ``samples`` items, each collated alone."""
        shapes: dict[str, set[tuple[int, ...]]] = {}
        for index in range(min(samples, len(dataset))):  # type: ignore[arg-type]
            inputs = self.collated(dataset, [index])[0]
            for name, tensor in zip(input_names(inputs), tensors(inputs)):
                shapes.setdefault(name, set()).add(tuple(tensor.shape))
        varying = {}
        for name, seen in shapes.items():
            ranks = {len(shape) for shape in seen}
            if len(ranks) == 1:
                axes = [axis for axis in range(1, ranks.pop()) if len({shape[axis] for shape in seen}) > 1]
                if axes:
                    varying[name] = axes
        return varying


def targets_tensor(targets: list[Any]) -> Any:
    """Batch targets joined along the batch axis (tensors), or kept as a list where they are not tensors."""
    if targets and all(isinstance(target, torch.Tensor) for target in targets):
        return torch.cat([target.reshape(-1, *target.shape[1:]) if target.dim() else target.reshape(1) for target in targets])
    return [item for target in targets for item in (target if isinstance(target, (list, tuple)) else [target])]


__all__ = ["BatchError", "BatchFormat", "map_tensors", "numpy_feed", "targets_tensor"]
