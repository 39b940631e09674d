"""The model families users bring, for the contract suite, the end-to-end tests and ``benchmarks/user_models.py``.

- ``resnet18``: a CIFAR-style ResNet-18 (3x3 stem, no max-pool) with torchvision's module layout and names
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``). torchvision itself does not import
  beside the CPU torch on these machines (its 0.28.0 wheel: ``operator torchvision::nms does not exist``); its own
  ``resnet18`` has the same layers and takes the same path.
- ``mobilenet_v2``: torchvision's MobileNetV2 layout (``features.N.conv.M``, inverted residuals with depthwise
  3x3 convolutions, ReLU6, ``classifier.1``), strided for 32x32 inputs.
- ``bert`` and ``vit``: Hugging Face ``BertForSequenceClassification`` and ``ViTForImageClassification`` from
  small configs (random init, nothing downloaded), fed dict batches, returning a ``ModelOutput``.

``width`` scales the CNNs (torchvision's ``width_mult``; 64 and 1.0 are the published sizes): the contract suite runs
narrow copies of the same graphs, the benchmark the full ones.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with a CIFAR stem (3x3 convolution, stride 1, no max-pool)."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = [] if expand_ratio == 1 else [Conv2dNormActivation(inp, hidden, kernel=1)]
        layers += [Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2``; the stem and the first stage keep stride 1 for 32x32 inputs (as CIFAR ports do)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        settings = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        channels = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [Conv2dNormActivation(in_channels, channels, stride=1)]
        for t, c, n, s in settings:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(Conv2dNormActivation(channels, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, in_channels)


def bert(num_classes: int = 10, vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4, max_length: int = 64) -> nn.Module:
    """A small ``BertForSequenceClassification`` (random init), eager attention so that it traces and exports."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=max_length, num_labels=num_classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def vit(num_classes: int = 10, image_size: int = 32, patch_size: int = 8, channels: int = 3, hidden_size: int = 32, layers: int = 2, heads: int = 4) -> nn.Module:
    """A small ``ViTForImageClassification`` (random init): ``pixel_values`` in, ``logits`` out."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden_size, num_labels=num_classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def family_inputs(name: str, batch: int, seed: int = 0):
    """Model inputs of ``FAMILIES[name]`` for ``batch`` samples, in the structure the model takes."""
    generator = torch.Generator().manual_seed(seed)
    if name == "bert":
        mask = torch.ones(batch, 16, dtype=torch.long)
        mask[:, 12:] = 0
        return {"input_ids": torch.randint(0, 64, (batch, 16), generator=generator), "attention_mask": mask}
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    return torch.randn(batch, 3, 32, 32, generator=generator)


# narrow copies of the same graphs, for the contract suite
FAMILIES = {
    "resnet18": lambda: resnet18(width=8),
    "mobilenet_v2": lambda: mobilenet_v2(width_mult=0.25),
    "bert": bert,
    "vit": lambda: vit(hidden_size=32),
}
