"""The Gabor attack (Kang et al.'s UAR): sparse noise convolved with Gabor kernels, scaled into the Linf ball.

A noise map ``phi`` (B, H * W) with values in [-1, 1] is kept only on a random sparse set of pixels (each
pixel with probability ``density``, drawn once per call), convolved with the sum of a bank of Gabor
kernels at ``orientations`` evenly spaced angles, normalized to max-abs 1 per example and scaled by eps:

    delta = eps * g / max|g|,   g = (mask * phi) conv sum_theta G_theta,   x_adv = clip(x + delta, 0, 1),

so ``|delta| <= eps`` per pixel by construction. The pattern is the same in every channel (grey-level
noise, as in UAR). Only ``phi`` is optimized, by :func:`box_ascent`; the mask and kernels are fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .norms import per_example
from .registry import positive, positive_int, register
from .transforms import ModelFn, box_ascent

__all__ = ["gabor", "gabor_kernel", "gabor_transform"]


def gabor_kernel(
    size: int,
    sigma: float,
    wavelength: float,
    orientations: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Sum (size, size) of the Gabor kernels exp(-(u^2 + v^2) / 2 sigma^2) cos(2 pi u / wavelength),
    u = x cos(theta) + y sin(theta), v = -x sin(theta) + y cos(theta), over theta = k pi / orientations.

    ``size`` odd, in pixels; ``sigma`` (std of the isotropic Gaussian envelope) and ``wavelength`` in pixels.
    """
    r = size // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")  # (size, size)
    envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    kernel = torch.zeros_like(envelope)
    for k in range(orientations):
        theta = k * math.pi / orientations
        kernel += envelope * torch.cos(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / wavelength)
    return kernel.to(dtype=dtype, device=device)


def gabor_transform(x: Tensor, phi: Tensor, mask: Tensor, kernel: Tensor, eps: Tensor) -> Tensor:
    """x (B, C, H, W) plus ``eps`` (B, 1, 1, 1) times the Gabor noise of ``phi * mask`` (B, H * W) normalized
    to max-abs 1, clamped to [0, 1]. ``kernel`` (k, k) from :func:`gabor_kernel`, applied with zero padding."""
    b, _, h, w = x.shape
    k = kernel.shape[-1]
    noise = F.conv2d((phi * mask).view(b, 1, h, w), kernel.view(1, 1, k, k), padding=k // 2)  # (B, 1, H, W)
    delta = eps * noise / noise.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return (x + delta).clamp(0, 1)  # delta broadcasts over the channels


def _density(label: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{label} must be in (0, 1], got {value!r}")


def _odd(label: str, value: int) -> None:
    positive_int(label, value)
    if value % 2 == 0:
        raise ValueError(f"{label} must be odd, got {value!r}")


@register(
    "gabor",
    norm=None,
    checks={
        "density": _density,
        "kernel_size": _odd,
        "sigma": positive,
        "wavelength": positive,
        "orientations": positive_int,
    },
)
def gabor(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 0.3,
    steps: int = 20,
    density: float = 0.2,
    kernel_size: int = 13,
    sigma: float = 3.0,
    wavelength: float = 8.0,
    orientations: int = 4,
    random_start: bool = True,
) -> Tensor:
    """Worst-case Gabor noise (UAR's Gabor attack, Kang et al. 2019) with ``|x_adv - x| <= eps`` per pixel
    ([0, 1] scale) by construction: sign-gradient ascent on a sparse noise map in [-1, 1], convolved with
    ``orientations`` Gabor kernels (``kernel_size`` x ``kernel_size``, envelope std ``sigma``, ``wavelength``,
    all in pixels) and normalized (see the module doc). The sparse support (``density`` of the pixels) is
    drawn from torch's global generator. ``eps`` may be a (B,) tensor. Defaults for 28x28 MNIST: eps 0.3 (the
    usual MNIST Linf budget), 20 steps, a fifth of the pixels, 13x13 kernels with sigma 3 and wavelength 8
    pixels at 4 orientations (their strength: docs/attacks.md).
    """
    b, _, h, w = x.shape
    mask = (torch.rand(b, h * w, device=x.device) < density).to(x.dtype)  # (B, H * W), fixed for the call
    kernel = gabor_kernel(kernel_size, sigma, wavelength, orientations, dtype=x.dtype, device=x.device)
    scale = per_example(eps, x)  # (B, 1, 1, 1)

    def transform(images: Tensor, phi: Tensor) -> Tensor:
        return gabor_transform(images, phi, mask, kernel, scale)

    ones = torch.ones(h * w)
    return box_ascent(model_fn, x, y, transform=transform, low=-ones, high=ones, steps=steps, random_start=random_start)
