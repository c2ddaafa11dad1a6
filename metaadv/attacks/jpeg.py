"""The JPEG attack (Kang et al.'s UAR): a perturbation of the 8x8 block DCT coefficients, bounded in Linf.

The image is padded at the bottom and right to multiples of 8 (28x28 MNIST becomes 32x32), cut into 8x8
blocks per channel, transformed with the orthonormal DCT-II (a matrix product ``D @ block @ D.T``), the
perturbation is added to the coefficients, and the inverse DCT is cropped back to H x W and clamped to
[0, 1]. The transform is linear, so the padding's values never reach the output (zeros are used); the
coefficients of the padded area are optimized too but only their effect inside the crop counts.

Unlike UAR, the coefficients are not divided by the JPEG quantization table and there is no YCbCr
conversion: every frequency of every channel has the same budget eps, in orthonormal-DCT units of the
[0, 1] pixel scale (a coefficient change of eps adds eps times a basis image of unit L2 norm, i.e. at
most eps / 8 per pixel for the DC coefficient and eps / 4 for the others).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .norms import per_example
from .registry import register
from .transforms import ModelFn, box_ascent

__all__ = ["block_dct", "block_idct", "dct_matrix", "jpeg_linf", "jpeg_transform"]

BLOCK = 8  # JPEG's block size in pixels


def dct_matrix(n: int = BLOCK, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The orthonormal DCT-II matrix D (n, n): ``D[k, i] = c_k cos(pi (2i + 1) k / 2n)``, c_0 = sqrt(1/n),
    c_k = sqrt(2/n); ``D @ D.T = I``, so a block's coefficients are ``D @ b @ D.T`` and ``b = D.T @ c @ D``."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def block_dct(x: Tensor) -> Tensor:
    """Coefficients (B, C, H/8, W/8, 8, 8) of the 8x8 blocks of x (B, C, H, W), H and W multiples of 8."""
    b, c, h, w = x.shape
    d = dct_matrix(dtype=x.dtype, device=x.device)
    blocks = x.view(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(3, 4)  # (B, C, H/8, W/8, 8, 8)
    return d @ blocks @ d.T


def block_idct(coef: Tensor) -> Tensor:
    """Images (B, C, H, W) from block coefficients (B, C, H/8, W/8, 8, 8); the inverse of :func:`block_dct`."""
    b, c, hb, wb, _, _ = coef.shape
    d = dct_matrix(dtype=coef.dtype, device=coef.device)
    return (d.T @ coef @ d).transpose(3, 4).reshape(b, c, hb * BLOCK, wb * BLOCK)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def jpeg_transform(x: Tensor, phi: Tensor) -> Tensor:
    """x (B, C, H, W) with ``phi`` (B, C * H' * W') added to its block DCT coefficients, in [0, 1].

    H', W' are H, W rounded up to multiples of 8 (zero padding at the bottom and right, cropped off after
    the inverse DCT); phi is laid out as (B, C, H'/8, W'/8, 8, 8) (see :func:`block_dct`).
    """
    _, _, h, w = x.shape
    padded = F.pad(x, (0, _padded(w) - w, 0, _padded(h) - h))  # (B, C, H', W')
    coef = block_dct(padded)
    return block_idct(coef + phi.view_as(coef))[:, :, :h, :w].clamp(0, 1)


@register("jpeg_linf", norm=None)
def jpeg_linf(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 0.1,
    steps: int = 20,
    random_start: bool = True,
) -> Tensor:
    """Worst-case change of the 8x8 block DCT coefficients, each by at most ``eps`` (UAR's JPEG attack,
    Kang et al. 2019, without the quantization table; see the module doc): sign-gradient ascent on the
    coefficients, then inverse DCT and clamp to [0, 1]. ``eps`` in orthonormal-DCT units of the [0, 1]
    pixel scale, may be a (B,) tensor. Defaults for 28x28 MNIST: eps 0.1, 20 steps (their strength:
    docs/attacks.md).
    """
    size = x.shape[1] * _padded(x.shape[2]) * _padded(x.shape[3])
    bound = per_example(eps, x).reshape(-1, 1).expand(-1, size)  # (B, C * H' * W')
    return box_ascent(
        model_fn, x, y, transform=jpeg_transform, low=-bound, high=bound, steps=steps, random_start=random_start
    )
