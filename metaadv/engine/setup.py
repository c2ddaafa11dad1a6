"""What a run needs before its first step: the device, the optimizer, the training tensors, deterministic kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import OPTIMIZERS
from ..data import to_tensors
from ..validation import check_images, check_labels, check_logits

__all__ = ["deterministic_algorithms", "make_optimizer", "resolve_device", "training_tensors"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as ``torch.device`` reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``"adam"`` or ``"sgd"`` (momentum 0.9) over ``params`` (tensors or parameter groups)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def training_tensors(
    model: nn.Module, data: Dataset | tuple[Tensor, Tensor], device: torch.device, *, images: bool = True
) -> tuple[Tensor, Tensor]:
    """The training set as tensors on ``device``: x (N, C, H, W), y (N,), checked against the model's output.

    ``images``: also check that x holds images in [0, 1], once here, so that the training-time attacks can skip
    their per-call checks (``Attack(..., check=False)``), which read values back from the device."""
    x, y = to_tensors(data)
    x, y = x.to(device), y.to(device)
    if images:
        check_images(x, "training images")
    was_training = model.training
    model.eval()  # an eval-mode probe leaves BatchNorm statistics untouched
    try:
        with torch.no_grad():
            out = model(x[:2])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"the model failed on a batch of training images of shape {tuple(x[:2].shape)} "
            f"(dtype {x.dtype}, device {x.device}): {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    logits = check_logits(out, min(2, len(x)))
    if logits.shape[1] < 2:
        raise ValueError(f"model output must be logits of shape (batch, num_classes >= 2), got {tuple(logits.shape)}")
    check_labels(y, len(x), logits.shape[1], "training labels")
    return x, y


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside: deterministic cuDNN/cuBLAS kernels (GPU runs repeat exactly); the previous flags are restored after.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a deterministic
    kernel warns instead of failing), ``cudnn.deterministic=True``, ``cudnn.benchmark=False`` and, if
    unset, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. CPU runs are deterministic without it.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
