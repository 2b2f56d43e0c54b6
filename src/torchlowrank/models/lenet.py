"""LeNet-5 (LeCun et al. 1998) for 28x28 single-channel images, as used in the DLRT experiments."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """x (N, C, 28, 28) -> logits (N, num_classes). Conv(6,5x5,pad 2) -> pool -> Conv(16,5x5) -> pool -> 120 -> 84 -> classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"LeNet5 expects 28x28 images, got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x))
