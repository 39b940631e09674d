"""A user's own task for netshrink's README: a small text classifier over token ids, trained beforehand.

Everything here is the user's code; netshrink only imports it through the experiment file
(``own-model.yaml``): the dataset factory yields dicts as Hugging Face pipelines do, the model takes
``input_ids`` and ``attention_mask`` and returns a dict with ``logits``, and the metric is the
user's own. ``python train.py`` trains the model and writes ``trained.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB, LENGTH = 64, 16
TOPICS = ((3, 4), (5, 6), (7, 8), (9, 10))  # class k: its sentences use topic k's two marker words


class Sentences(Dataset):
    """Synthetic sentences of 8 to 16 random words, with one or two marker words of their class's topic; some
    sentences of class 3 also carry a marker of class 2, so the classes overlap a little."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            label = index % len(TOPICS)
            length = int(torch.randint(8, LENGTH + 1, (1,), generator=generator))
            words = torch.randint(16, VOCAB, (length,), generator=generator)
            for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
                words[int(torch.randint(0, length, (1,), generator=generator))] = TOPICS[label][int(torch.randint(0, 2, (1,), generator=generator))]
            if label == 3 and float(torch.rand(1, generator=generator)) < 0.3:
                words[int(torch.randint(0, length, (1,), generator=generator))] = TOPICS[2][0]
            self.items.append({"input_ids": words, "attention_mask": torch.ones(length, dtype=torch.long), "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def sentences():
    """(train, validation, test) splits."""
    return Sentences(800, 0), Sentences(400, 1), Sentences(400, 2)


def pad(items: list[dict]) -> dict:
    """Pads every sentence to LENGTH words (word 0, mask 0), like a tokenizer with padding="max_length"."""
    ids = torch.zeros(len(items), LENGTH, dtype=torch.long)
    mask = torch.zeros(len(items), LENGTH, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["attention_mask"])] = item["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}


class TextClassifier(nn.Module):
    """Word embeddings, one transformer encoder layer, a masked mean over the words, a classifier."""

    def __init__(self, num_classes: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return {"logits": self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))}


def text_classifier(num_classes: int = 4) -> nn.Module:
    return TextClassifier(num_classes)


def balanced_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean over classes of the share of that class answered right (robust to unbalanced classes)."""
    predictions = outputs.argmax(dim=-1)
    recalls = [float((predictions[targets == label] == label).float().mean()) for label in torch.unique(targets)]
    return sum(recalls) / len(recalls)
