"""The tasks of ``benchmarks/user_models.py``, written as a user writes them (``module:factory`` in the experiment file).

- ``digits_rgb``: scikit-learn's digits upsampled to 32x32 and repeated over 3 channels, the input of a CIFAR-style
  CNN, as ``(image, label)`` pairs;
- ``digits_pixels``: the same images as Hugging Face image models take them: dicts of ``pixel_values`` and ``labels``;
- ``sentences``: synthetic sentences of token ids (up to 64) with ``attention_mask`` and ``labels``, as a tokenizer
  pads them; each class has its own marker words, and some sentences of one class carry a marker of another;
- the models come from ``tests/families.py`` (torchvision's ResNet-18 and MobileNetV2 layouts, Hugging Face BERT and
  ViT from small configs), at their published widths.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from netshrink.tasks.datasets import digits
from tests.families import bert, mobilenet_v2, resnet18, vit  # noqa: F401  (the experiment files name them here)

MEAN, STD = 0.3, 0.4  # of the digits' grey levels in [0, 1], roughly


def _rgb(data, image_size: int):
    """Each split of ``digits(image_size)`` as 3-channel normalised image tensors and labels."""
    splits = []
    for split in (data.train, data.val, data.test):
        images, labels = split.tensors
        splits.append(((images.repeat(1, 3, 1, 1) - MEAN) / STD, labels))
    return splits


def digits_rgb(image_size: int = 32):
    """(train, validation, test) of ``(3 x 32 x 32 image, label)``."""
    return tuple(TensorDataset(images, labels) for images, labels in _rgb(digits(image_size=image_size), image_size))


class _Dicts(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def digits_pixels(image_size: int = 32):
    """(train, validation, test) of ``{"pixel_values": 3 x 32 x 32, "labels": label}``, as Hugging Face image models take them."""
    return tuple(
        _Dicts([{"pixel_values": image, "labels": int(label)} for image, label in zip(images, labels)])
        for images, labels in _rgb(digits(image_size=image_size), image_size)
    )


VOCAB, LENGTH, CLASSES = 512, 64, 4


class _Sentences(Dataset):
    """Sentences of 24 to 64 random words; class k's sentences carry two or three of its 4 marker words; 20% of class 3's
    also carry a marker of class 2, so that the classes overlap a little and the task has room to lose accuracy."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            label = index % CLASSES
            length = int(torch.randint(24, LENGTH + 1, (1,), generator=generator))
            words = torch.randint(4 * CLASSES + 2, VOCAB, (length,), generator=generator)
            words[0] = 1  # [CLS]
            for _ in range(int(torch.randint(2, 4, (1,), generator=generator))):
                words[int(torch.randint(1, length, (1,), generator=generator))] = 2 + 4 * label + int(torch.randint(0, 4, (1,), generator=generator))
            if label == 3 and float(torch.rand(1, generator=generator)) < 0.2:
                words[int(torch.randint(1, length, (1,), generator=generator))] = 2 + 4 * 2
            ids = torch.zeros(LENGTH, dtype=torch.long)
            mask = torch.zeros(LENGTH, dtype=torch.long)
            ids[:length], mask[:length] = words, 1
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def sentences(train: int = 2000, val: int = 500, test: int = 500):
    """(train, validation, test) of ``{"input_ids", "attention_mask", "labels"}``, padded to 64 tokens."""
    return _Sentences(train, 0), _Sentences(val, 1), _Sentences(test, 2)
