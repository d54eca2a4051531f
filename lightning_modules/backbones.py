"""Backbones shared by every LightningModule, chosen by ``class_path`` in YAML.

Each backbone is built as ``Backbone(in_channels, num_classes, ...)``: the LightningModule calls it
with the two numbers linked from the data module, so configs only name the architecture. Inputs are
images in pixel space [0, 1]; the LightningModule puts :class:`Normalize` in front of the backbone,
so attacks, noise and certified radii are all measured in pixel space.
"""

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Args:
        mean: One value per channel (or one value for all channels).
        std: One value per channel (or one value for all channels); all positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise ValueError(f"normalization std must be positive, got {list(std)}")
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize a batch ``(B, C, H, W)`` of pixel-space images."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the statistics when the model is printed."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class SmallCNN(nn.Sequential):
    """The seed experiment's CNN: two 3x3 convolutions, max-pool, dropout, two dense layers.

    conv(32) - conv(64) - maxpool - dropout(0.25) - fc(128) - dropout(0.5) - fc(num_classes), the
    classic Keras MNIST network. The pool is adaptive (12x12 output, exactly a 2x2 pool for 28x28
    inputs) so the network also takes other image sizes of at least 6x6.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(12),
            nn.Dropout(0.25 if dropout else 0.0),
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128),
            nn.ReLU(),
            nn.Dropout(0.5 if dropout else 0.0),
            nn.Linear(128, num_classes),
        )


class LeNet(nn.Sequential):
    """LeNet as used for published MNIST randomized-smoothing results (431,080 parameters).

    conv 1->20 5x5, max-pool 2, conv 20->50 5x5, max-pool 2, fc 800->500, fc 500->10; takes 28x28
    images only (the 800 = 50*4*4 features fix the input size).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )


class CifarResNet18(nn.Module):
    """torchvision's ResNet-18 adapted to 32x32 images (He et al. 2016, CIFAR variant).

    The 7x7 stride-2 stem and the max-pool are replaced by one 3x3 stride-1 convolution, as is
    standard for CIFAR-10 (e.g. Cohen et al. 2019 and Madry et al. 2018 use this family).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch ``(B, C, H, W)`` of normalized images."""
        return self.net(x)
