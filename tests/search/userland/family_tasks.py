"""The families users ship, as a user's module names them in the experiment file: ``families.py`` (a copy of
``tests/families.py``) beside it, and small learnable tasks for each: digits at 3x16x16 for the CNNs, the same as
``pixel_values`` dicts for the ViT, and sentences of token ids with marker words for BERT."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from families import bert, mobilenet_v2, resnet18, vit  # noqa: F401
from netshrink.tasks.datasets import digits


def _splits(image_size: int):
    data = digits(image_size=image_size)
    return [((split.tensors[0].repeat(1, 3, 1, 1) - 0.3) / 0.4, split.tensors[1]) for split in (data.train, data.val, data.test)]


def images(image_size: int = 16):
    """(train, val, test) of (3 x 16 x 16 digit, label)."""
    return tuple(TensorDataset(x, y) for x, y in _splits(image_size))


class Items(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def pixels(image_size: int = 16):
    """(train, val, test) of {"pixel_values", "labels"}, as Hugging Face image models take them."""
    return tuple(Items([{"pixel_values": x, "labels": int(y)} for x, y in zip(xs, ys)]) for xs, ys in _splits(image_size))


def sentences(length: int = 16, vocab: int = 64):
    """(train, val, test) of {"input_ids", "attention_mask", "labels"}: class k's sentences hold marker word 2 + k."""

    def split(count: int, seed: int) -> Items:
        generator = torch.Generator().manual_seed(seed)
        items = []
        for index in range(count):
            label = index % 4
            size = int(torch.randint(8, length + 1, (1,), generator=generator))
            ids = torch.zeros(length, dtype=torch.long)
            ids[:size] = torch.randint(8, vocab, (size,), generator=generator)
            ids[0] = 1
            ids[int(torch.randint(1, size, (1,), generator=generator))] = 2 + label
            mask = (torch.arange(length) < size).long()
            items.append({"input_ids": ids, "attention_mask": mask, "labels": label})
        return Items(items)

    return split(600, 0), split(200, 1), split(200, 2)
