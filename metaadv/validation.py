"""Input checks shared by every public entry point: errors name the argument, the value and what is allowed."""

from __future__ import annotations

import torch
from torch import Tensor


def check_images(x: object, name: str = "x") -> Tensor:
    """Check a batch of images: a float tensor (B, C, H, W) with finite values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} has no pixels (shape {tuple(x.shape)}); images need C, H, W >= 1")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; images must be finite and in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (normalization belongs inside the model), got range [{lo:.4g}, {hi:.4g}]"
        )
    return x


def check_labels(y: object, batch: int, num_classes: int | None = None, name: str = "y") -> Tensor:
    """Check integer class labels (B,) in [0, num_classes)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the images, got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} contains a negative label {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name} contains label {int(y.max())} but the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return y.long()


def check_logits(logits: object, batch: int, name: str = "model output") -> Tensor:
    """Check that a model returned logits of shape (batch, classes)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be logits of shape ({batch}, num_classes), got {shape}")
    return logits


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, name: str, minimum: int = 1, meaning: str = "") -> None:
    """Raise ValueError unless ``value`` is an integer >= ``minimum`` (``meaning``: what it counts, for the message)."""
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")


def check_positive(value: object, name: str, *, allow_zero: bool = False, integer: bool = False) -> None:
    """Raise ValueError/TypeError unless ``value`` is a positive (or non-negative) number."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
