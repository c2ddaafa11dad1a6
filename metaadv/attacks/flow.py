"""Flow-field attacks: ``elastic`` (a Gaussian-smoothed flow, Kang et al.'s UAR) and ``stadv`` (a per-pixel
flow with a smoothness penalty, Xiao et al. 2018).

Both optimize a displacement field ``flow`` (B, 2, H, W) in pixels with :func:`box_ascent` (each component
in [-eps, eps]) and warp the image with :func:`apply_flow`: bilinear ``grid_sample`` with border padding
(a sample from outside the image takes the nearest edge pixel). Channel 0 of the flow moves along the
width (x), channel 1 along the height (y); the output pixel (i, j) reads the input at
(i + flow[1, i, j], j + flow[0, i, j]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .norms import per_example
from .registry import non_negative, register
from .transforms import ModelFn, box_ascent

__all__ = ["apply_flow", "elastic", "elastic_transform", "flow_smoothness", "gaussian_blur", "stadv"]


def apply_flow(x: Tensor, flow: Tensor) -> Tensor:
    """Warp images x (B, C, H, W) by ``flow`` (B, 2, H, W) in pixels (bilinear, border padding), in [0, 1].

    Output pixel (i, j) is x sampled at row i + flow[:, 1, i, j], column j + flow[:, 0, i, j]; a zero
    flow returns x. Differentiable in flow.
    """
    _, _, h, w = x.shape
    # pixel centers in grid_sample's normalized coordinates (align_corners=False): (2k + 1) / size - 1
    cols = (2 * torch.arange(w, dtype=x.dtype, device=x.device) + 1) / w - 1  # (W,)
    rows = (2 * torch.arange(h, dtype=x.dtype, device=x.device) + 1) / h - 1  # (H,)
    gx = cols.view(1, 1, w) + flow[:, 0] * (2 / w)  # (B, H, W); a shift of t pixels is 2t / size
    gy = rows.view(1, h, 1) + flow[:, 1] * (2 / h)
    grid = torch.stack([gx, gy], dim=-1)  # (B, H, W, 2), (x, y) order
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


def gaussian_blur(v: Tensor, sigma: float) -> Tensor:
    """Blur each channel of v (B, C, H, W) with a normalized Gaussian of std ``sigma`` pixels.

    Separable kernel of radius ceil(3 sigma), entries positive and summing to 1, replicate padding: every
    output is a convex combination of inputs, so a field inside a box stays in it. ``sigma = 0``: v itself.
    """
    if sigma == 0:
        return v
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=v.dtype, device=v.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()  # (2r + 1,)
    c = v.shape[1]
    v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def elastic_transform(x: Tensor, phi: Tensor, sigma: float) -> Tensor:
    """Warp x (B, C, H, W) by the raw flow ``phi`` (B, 2 * H * W) in pixels, blurred with std ``sigma``."""
    b, _, h, w = x.shape
    return apply_flow(x, gaussian_blur(phi.view(b, 2, h, w), sigma))


def flow_smoothness(flow: Tensor) -> Tensor:
    """StAdv's L_flow (B,) of ``flow`` (B, 2, H, W) in pixels: over pairs of 4-neighbours p, q,
    sum sqrt(|u_p - u_q|^2 + |v_p - v_q|^2 + 1e-8).

    Each pair counts once (the paper's double sum over p and q in N(p) counts it twice, so its tau is half
    of ours); the 1e-8 keeps the gradient finite where neighbours agree.
    """
    right = flow[:, :, :, 1:] - flow[:, :, :, :-1]  # (B, 2, H, W - 1)
    down = flow[:, :, 1:, :] - flow[:, :, :-1, :]  # (B, 2, H - 1, W)

    def total(d: Tensor) -> Tensor:
        return ((d**2).sum(dim=1) + 1e-8).sqrt().flatten(1).sum(dim=1)  # (B,)

    return total(right) + total(down)


def _flow_box(eps: float | Tensor, x: Tensor) -> Tensor:
    """(B, 2 * H * W): each example's eps for every flow component."""
    return per_example(eps, x).reshape(-1, 1).expand(-1, 2 * x.shape[2] * x.shape[3])


@register("elastic", norm=None, checks={"sigma": non_negative})
def elastic(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 1.0,
    steps: int = 20,
    sigma: float = 1.0,
    random_start: bool = True,
) -> Tensor:
    """Worst-case elastic deformation (UAR's elastic attack, Kang et al. 2019): a flow field whose applied
    (blurred) components lie in [-eps, eps] pixels, by sign-gradient ascent on the raw field.

    The raw field phi (B, 2, H, W) is kept in the box |phi| <= eps and blurred by :func:`gaussian_blur`
    (std ``sigma`` pixels) before :func:`apply_flow`; the blur is a convex combination, so the applied flow
    obeys |G_sigma * phi| <= eps per component too. Border padding. ``eps`` may be a (B,) tensor.
    Defaults for 28x28 MNIST: eps 1 pixel, sigma 1 pixel, 20 steps (their strength: docs/attacks.md).
    """
    bound = _flow_box(eps, x)

    def transform(images: Tensor, phi: Tensor) -> Tensor:
        return elastic_transform(images, phi, sigma)

    return box_ascent(
        model_fn, x, y, transform=transform, low=-bound, high=bound, steps=steps, random_start=random_start
    )


@register("stadv", norm=None, checks={"tau": non_negative})
def stadv(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor = 1.0,
    steps: int = 20,
    tau: float = 0.001,
    random_start: bool = True,
) -> Tensor:
    """Spatially transformed adversarial examples (StAdv, Xiao et al. 2018): a per-pixel flow, each
    component in [-eps, eps] pixels, maximizing cross-entropy - tau * :func:`flow_smoothness`.

    Sign-gradient ascent on the flow (B, 2, H, W) in the box, applied by :func:`apply_flow` (bilinear,
    border padding); ``eps`` may be a (B,) tensor. The paper uses L-BFGS on an unbounded flow with a margin
    loss and tau 0.05; here tau weighs L_flow (in pixels) against each example's cross-entropy, whose
    gradient vanishes on confident examples, so sign steps need a smaller tau (a uniform random flow in
    [-1, 1] on 28x28 has L_flow ~ 1600, i.e. costs 1.6 nats at tau 0.001). Defaults for 28x28 MNIST: eps 1
    pixel, tau 0.001, 20 steps (their strength: docs/attacks.md).
    """
    b, _, h, w = x.shape
    bound = _flow_box(eps, x)

    def transform(images: Tensor, phi: Tensor) -> Tensor:
        return apply_flow(images, phi.view(b, 2, h, w))

    def penalty(phi: Tensor) -> Tensor:
        return tau * flow_smoothness(phi.view(b, 2, h, w))

    return box_ascent(
        model_fn,
        x,
        y,
        transform=transform,
        low=-bound,
        high=bound,
        steps=steps,
        random_start=random_start,
        penalty=penalty,
    )
