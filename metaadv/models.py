"""Reference classifiers. Any ``nn.Module`` mapping images in [0, 1] to logits works with metaadv."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PreActResNet18", "SmallCNN", "build"]


class SmallCNN(nn.Module):
    """The small two-conv CNN of the MNIST adversarial-robustness literature (Madry et al. 2018, Maini et al. 2020).

    conv5x5(32) -> [BN] -> ReLU -> maxpool2 -> conv5x5(64) -> [BN] -> ReLU -> maxpool2 -> FC(hidden) -> ReLU -> FC.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        num_classes: number of output logits.
        batch_norm: add BatchNorm after each conv (needed to exercise per-task BN).
        image_size: input height = width in pixels (28 for MNIST, 32 for CIFAR-10).
        hidden: width of the hidden fully connected layer.

    Input (B, in_channels, image_size, image_size) in [0, 1]; output logits (B, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        batch_norm: bool = True,
        *,
        image_size: int = 28,
        hidden: int = 1024,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.num_classes = num_classes

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(cout)] if batch_norm else []
            return [
                nn.Conv2d(cin, cout, 5, padding=2, bias=not batch_norm),
                *norm,
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3, plus the shortcut.

    The shortcut is the identity, or a 1x1 conv (applied after the first BN-ReLU) when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    """PreActResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"), the CIFAR-10 model of
    the adversarial-training literature (Rice et al. 2020; Maini et al. 2020; RAMP): 11.2M parameters.

    conv3x3(64) -> 4 stages of 2 pre-activation blocks (64, 128, 256, 512 channels; stride 1, 2, 2, 2)
    -> BN -> ReLU -> global average pool -> FC. No input normalization: images in [0, 1] go straight in.

    Args:
        in_channels: image channels (3 for CIFAR-10, 1 for MNIST).
        num_classes: number of output logits.

    Input (B, in_channels, H, W) in [0, 1] (32x32 for CIFAR-10; any size >= 8 works); output logits (B, num_classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes)))
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))  # (B, 512, H/8, W/8)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)  # (B, 512)
        return self.linear(out)  # (B, num_classes)


def build(spec: dict) -> nn.Module:
    """Build a model from a config mapping ``{"name": "SmallCNN", **kwargs}`` (names from this module)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    classes = {"PreActResNet18": PreActResNet18, "SmallCNN": SmallCNN}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; available: {sorted(classes)}")
    try:
        return classes[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name}: {e}") from None
