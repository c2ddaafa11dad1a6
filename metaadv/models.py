"""Reference classifiers. Any ``nn.Module`` mapping images in [0, 1] to logits works with metaadv."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN", "build"]


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


def build(spec: dict) -> nn.Module:
    """Build a model from a config mapping ``{"name": "SmallCNN", **kwargs}`` (names from this module)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    classes = {"SmallCNN": SmallCNN}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; available: {sorted(classes)}")
    try:
        return classes[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name}: {e}") from None
