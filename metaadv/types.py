"""The two shapes every layer passes around: a model as a function of images, and named tensors."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["ModelFn", "Params"]

ModelFn = Callable[[Tensor], Tensor]  # images (B, C, H, W) in [0, 1] -> logits (B, K)
Params = dict[str, Tensor]  # parameter or buffer name -> tensor
