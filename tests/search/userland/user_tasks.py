"""Users' own tasks, as a user writes them: a CNN with trained weights, a text classifier over token ids fed dict
batches of varying length, a model with two tensor inputs, and a loss and a metric of the user's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from netshrink.tasks.datasets import digits


class SmallCNN(nn.Module):
    """What a user trained: two convolutions with BatchNorm and a classifier, on 8x8 digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def small_cnn(num_classes: int = 10) -> nn.Module:
    return SmallCNN(num_classes)


# --- a text classifier over integer token ids, fed dicts with an attention mask -------------------------------------

VOCAB, MARKERS = 40, (3, 4, 5)  # the class is which marker token the sequence holds


class Sentences(Dataset):
    """Token-id sequences of 6 to 12 tokens; class k holds marker token ``MARKERS[k]`` somewhere among random words."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            length = int(torch.randint(6, 13, (1,), generator=generator))
            words = torch.randint(len(MARKERS) + 3, VOCAB, (length,), generator=generator)
            label = index % len(MARKERS)
            words[int(torch.randint(0, length, (1,), generator=generator))] = MARKERS[label]
            self.items.append({"input_ids": words, "attention_mask": torch.ones(length, dtype=torch.long), "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def sentences():
    return Sentences(300, 0), Sentences(90, 1), Sentences(90, 2)


MAX_LENGTH = 12


def pad(items: list[dict]) -> dict:
    """Pads every sequence to ``MAX_LENGTH`` (token 0, mask 0), as a Hugging Face tokenizer with padding="max_length" does.
    (``nn.MultiheadAttention`` exports to ONNX with its sequence length fixed: validation says so for a collate that pads
    to the longest sequence of each batch.)"""
    longest = MAX_LENGTH
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = item["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}


class TextClassifier(nn.Module):
    """``nn.Embedding`` + ``nn.TransformerEncoder``, mean-pooled over the unmasked tokens; returns a dict with ``logits``."""

    def __init__(self, num_classes: int = 3, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"logits": self.head(pooled)}


def text_classifier(num_classes: int = 3) -> nn.Module:
    return TextClassifier(num_classes)


# --- a model with two tensor inputs ----------------------------------------------------------------------------------


class ImageAndFeatures(Dataset):
    """Digits as ((image, row sums), label): a second input that a model reads beside the image."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return (image, image.sum(dim=-1).flatten()), label


def two_inputs():
    data = digits(image_size=8)
    return ImageAndFeatures(data.train), ImageAndFeatures(data.val), ImageAndFeatures(data.test)


class TwoInputNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.features = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16 + 16, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, image, sums):
        x = F.relu(self.conv(image)).mean(dim=(2, 3))  # pooled: Torch-Pruning's concat mapping breaks on flattened maps
        return self.fc2(F.relu(self.fc1(torch.cat([x, F.relu(self.features(sums))], dim=1))))


def two_input_net(num_classes: int = 10) -> nn.Module:
    return TwoInputNet(num_classes)


# --- a loss and a metric of the user's own ---------------------------------------------------------------------------


def smoothed_cross_entropy(outputs, target):
    return F.cross_entropy(outputs, target, label_smoothing=0.1)


def balanced_accuracy(outputs, targets) -> float:
    """The mean over classes of the share of that class answered right."""
    predictions = outputs.argmax(dim=-1)
    recalls = [float((predictions[targets == label] == label).float().mean()) for label in torch.unique(targets)]
    return sum(recalls) / len(recalls)


def nan_metric(outputs, targets) -> float:
    return float("nan")


def unreduced_loss(outputs, target):
    return F.cross_entropy(outputs, target, reduction="none")
