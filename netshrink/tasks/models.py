"""Built-in models."""

from __future__ import annotations

from torch import nn


class LeNet5(nn.Module):
    """The Caffe LeNet-5 (20 and 50 conv filters, 500 hidden units): 431,080 parameters on 28x28 inputs.

    This is the network Deep Compression (Han et al., 2016) reports 39x on, so
    results here compare with the paper. As in Caffe's ``lenet_train_test``,
    there is no nonlinearity between the convolutions, only after ``fc1``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {image_size}x{image_size}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
