"""Built-in datasets. Everything ships inside an installed package: nothing is downloaded."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset


@dataclass
class TaskData:
    """Train, validation and test splits plus what a model factory needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int | None  # 1 + the largest class label; None where targets are not class labels
    input_shape: Any  # one sample's input shape, without the batch dimension (a tuple or dict of them for several inputs)


def digits(image_size: int = 28, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> TaskData:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), upsampled bilinearly to ``image_size``.

    The split is stratified and fixed by ``seed``: the same settings always give the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 8 <= image_size <= 256:
        raise ValueError(f"image_size must be between 8 and 256, got {image_size}")
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(raw.target, dtype=torch.long)
    index = np.arange(len(labels))
    rest, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=raw.target)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=raw.target[rest]
    )
    split = lambda idx: TensorDataset(images[idx], labels[idx])  # noqa: E731
    return TaskData(
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        num_classes=10,
        input_shape=(1, image_size, image_size),
    )


# Samples hashed per split when a dataset is not a TensorDataset (whose tensors are hashed whole):
# evenly spaced, first and last included, so an added, removed or changed file shows in most cases
# without reading a large dataset end to end.
DIGEST_SAMPLES = 512


def dataset_digest(dataset: Dataset) -> str:
    """SHA-256 over a split's length and contents, for the baseline's cache key.

    A ``TensorDataset`` is hashed whole. Any other dataset is hashed on
    ``DIGEST_SAMPLES`` evenly spaced samples, read under fixed seeds of torch,
    numpy and ``random`` (restored afterwards), so random augmentation gives the
    same digest every time.
    """
    import random

    digest = hashlib.sha256(f"{type(dataset).__name__}:{len(dataset)}".encode())  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _update(digest, tensor)
        return digest.hexdigest()
    count = len(dataset)  # type: ignore[arg-type]
    indices = sorted({round(i * (count - 1) / max(DIGEST_SAMPLES - 1, 1)) for i in range(min(count, DIGEST_SAMPLES))})
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        try:
            for index in indices:
                _update_item(digest, dataset[index])
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
    return digest.hexdigest()


def _update_item(digest, item) -> None:
    """Hash an item of any usual structure: a dict by its keys and values, a tuple or list element by element."""
    if isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(str(key).encode())
            _update_item(digest, item[key])
    elif isinstance(item, (tuple, list)):
        for part in item:
            _update_item(digest, part)
    else:
        _update(digest, item)


def _update(digest, value) -> None:
    try:
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
    except (TypeError, ValueError, RuntimeError):  # a string, a dict of fields: hashed by its text
        digest.update(repr(value).encode())
        return
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; the bits are what count
        tensor = tensor.view(torch.int16)
    digest.update(tensor.numpy().tobytes())
