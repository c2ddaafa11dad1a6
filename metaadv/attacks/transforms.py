"""Attacks outside the Lp balls: worst-case image transforms with a bound in their own parameter space.

One loop, :func:`box_ascent`, maximizes the cross-entropy over a per-example parameter vector ``phi``
(B, P) confined to a box ``[low, high]`` (sign-gradient steps, projection by clamping, like PGD-Linf
but on the transform's parameters), and returns ``transform(x, phi)``. Its configurations:

- ``spatial``: rotation and translation (Engstrom et al. 2019, first-order version), and
  ``spatial_grid``: the worst of a grid of rotations x translations (their grid attack, no gradient).
- ``color``: brightness and contrast (per channel for RGB).

Every transform keeps images in [0, 1]; the returned image is exactly ``transform(x, phi)`` for a
``phi`` inside the box, which is the attack's threat model (not an Lp ball).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ModelFn
from .registry import register

__all__ = ["box_ascent", "color", "color_transform", "spatial", "spatial_grid", "spatial_transform"]

Transform = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, H, W), phi (B, P)) -> images (B, C, H, W)


@torch.enable_grad()
def box_ascent(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    transform: Transform,
    low: Tensor,
    high: Tensor,
    steps: int,
    alpha: Tensor | None = None,
    random_start: bool = True,
    penalty: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Maximize the cross-entropy of ``model_fn(transform(x, phi))`` over ``phi`` in ``[low, high]``.

    ``low``/``high`` (P,) or (B, P) bound each parameter; ``alpha`` (same shape) is the sign-step
    size per parameter (default 2.5 * (high - low) / 2 / steps). Start uniform in the box (or at
    ``phi = 0`` clamped into it). ``penalty(phi) -> (B,)``, if given, is subtracted from each example's
    loss (e.g. StAdv's flow smoothness). Shapes: x (B, C, H, W) in [0, 1], y (B,). Returns (B, C, H, W).
    """
    x = x.detach()
    low, high = low.to(x).expand(len(x), -1), high.to(x).expand(len(x), -1)  # (B, P)
    a = 2.5 * (high - low) / 2 / steps if alpha is None else alpha.to(x).expand_as(low)
    phi = low + (high - low) * torch.rand_like(low) if random_start else torch.zeros_like(low)
    phi = torch.maximum(torch.minimum(phi, high), low)
    for _ in range(steps):
        phi.requires_grad_(True)
        loss = F.cross_entropy(model_fn(transform(x, phi)), y, reduction="sum")
        if penalty is not None:
            loss = loss - penalty(phi).sum()
        (grad,) = torch.autograd.grad(loss, phi)
        phi = torch.maximum(torch.minimum(phi.detach() + a * grad.sign(), high), low)
    return transform(x, phi).detach()


def spatial_transform(x: Tensor, phi: Tensor) -> Tensor:
    """Rotate by ``phi[:, 0]`` degrees about the center and translate by ``phi[:, 1:3]`` pixels (x, y).

    Bilinear sampling with zero (black) padding; x (B, C, H, W), phi (B, 3). Differentiable in phi.
    """
    b, _, h, w = x.shape
    rad = phi[:, 0] * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: a shift of t pixels is 2t/size
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, -2 * phi[:, 1] / w], dim=1),
            torch.stack([sin * w / h, cos, -2 * phi[:, 2] / h], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def _spatial_box(max_rot: float, max_trans: float) -> tuple[Tensor, Tensor]:
    high = torch.tensor([max_rot, max_trans, max_trans])
    return -high, high


def _non_negative(label: str, value: float) -> None:
    if not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")


@register("spatial", norm=None, checks={"max_rot": _non_negative, "max_trans": _non_negative})
def spatial(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    max_rot: float = 30.0,
    max_trans: float = 3.0,
    steps: int = 10,
    random_start: bool = True,
) -> Tensor:
    """Worst-case rotation (|angle| <= ``max_rot`` degrees) and translation (|shift| <= ``max_trans``
    pixels per axis) found by sign-gradient ascent on the 3 transform parameters (Engstrom et al. 2019,
    first-order attack; their MNIST bounds are 30 degrees and 3 pixels). Zero padding outside the image."""
    low, high = _spatial_box(max_rot, max_trans)
    return box_ascent(
        model_fn, x, y, transform=spatial_transform, low=low, high=high, steps=steps, random_start=random_start
    )


@register("spatial_grid", norm=None, checks={"max_rot": _non_negative, "max_trans": _non_negative})
def spatial_grid(
    model_fn: ModelFn, x: Tensor, y: Tensor, *, max_rot: float = 30.0, max_trans: float = 3.0, n: int = 5
) -> Tensor:
    """The worst of an ``n`` x ``n`` x ``n`` grid of rotations x translations (Engstrom et al. 2019's
    grid search; no gradient): per example, the first transform that misclassifies it, else the one
    with the highest loss. ``n`` points per parameter, evenly spaced over [-bound, bound]."""
    low, high = _spatial_box(max_rot, max_trans)
    axes = [torch.linspace(float(lo), float(hi), n if hi > lo else 1) for lo, hi in zip(low, high, strict=True)]
    best, best_key = x.detach().clone(), None
    with torch.no_grad():
        for values in itertools.product(*axes):
            phi = torch.stack(values).to(x).expand(len(x), -1)
            cand = spatial_transform(x, phi)
            logits = model_fn(cand)
            key = F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(1) != y)  # fooled first
            better = key > best_key if best_key is not None else torch.ones_like(y, dtype=torch.bool)
            best = torch.where(better.view(-1, 1, 1, 1), cand, best)
            best_key = key if best_key is None else torch.maximum(key, best_key)
    return best


def color_transform(x: Tensor, phi: Tensor) -> Tensor:
    """Brightness and contrast per channel: ``(x - m) * (1 + c) + m + b``, clipped to [0, 1].

    ``m`` is the channel's mean intensity per image; phi (B, 2C) holds ``b`` for each channel, then
    ``c`` for each channel. x (B, C, H, W).
    """
    c = x.shape[1]
    shift, contrast = phi[:, :c, None, None], phi[:, c:, None, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * (1 + contrast) + mean + shift).clamp(0, 1)


@register("color", norm=None)
def color(model_fn: ModelFn, x: Tensor, y: Tensor, *, eps: float, steps: int = 10, random_start: bool = True) -> Tensor:
    """Worst-case brightness shift ``|b| <= eps`` and contrast change ``|c| <= eps`` per channel (one
    channel for grayscale; for RGB each channel moves independently, which also shifts hue and
    saturation), by sign-gradient ascent on the 2C parameters; see :func:`color_transform`."""
    bound = torch.full((2 * x.shape[1],), float(eps))
    return box_ascent(
        model_fn, x, y, transform=color_transform, low=-bound, high=bound, steps=steps, random_start=random_start
    )
