"""Built-in datasets. Everything ships inside an installed package: nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass

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
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, without the batch dimension


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
