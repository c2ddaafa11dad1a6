"""Lp geometry for attacks: steepest-ascent step, projection onto the eps ball and random points in it.

Each norm object works on perturbations ``delta`` (B, C, H, W) with a per-example radius ``eps``
of shape (B, 1, 1, 1) (see :func:`per_example`). Used by the steepest-ascent loop and the noise
baseline; the L1 projection is the exact sorting-based one of Duchi et al. (2008).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = ["L0", "L1", "L2", "NORMS", "Linf", "LpNorm", "per_example", "project_l1"]


def per_example(value: float | Tensor, x: Tensor) -> Tensor:
    """A float or a (B,)/0-d tensor as a (B, 1, 1, 1) tensor on x's device and dtype.

    A float is filled on the device (one kernel, where ``torch.as_tensor`` would be a blocking host copy)."""
    if isinstance(value, Tensor):
        t = value.to(device=x.device, dtype=x.dtype)
    else:
        t = torch.full((), value, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))


def _flat(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1)  # (B, D)


class LpNorm:
    """Interface: the geometry of one Lp ball around each image."""

    name: str

    def norm(self, v: Tensor) -> Tensor:
        """Per-example norm, shape (B,)."""
        raise NotImplementedError

    def step(self, grad: Tensor, alpha: Tensor, x_cur: Tensor) -> Tensor:
        """Steepest-ascent step of size ``alpha`` (B, 1, 1, 1) in this norm for the gradient at ``x_cur``."""
        raise NotImplementedError

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        """Euclidean projection of ``delta`` onto the ball of radius ``eps`` (B, 1, 1, 1)."""
        raise NotImplementedError

    def uniform(self, like: Tensor, eps: Tensor) -> Tensor:
        """A point drawn uniformly from the ball (by volume)."""
        raise NotImplementedError

    def sample(self, like: Tensor, eps: Tensor, dist: str = "uniform") -> Tensor:
        """Random perturbation: ``"uniform"`` in the ball, or ``"gaussian"``: a Gaussian direction
        scaled to the ball's surface (norm exactly eps)."""
        if dist == "uniform":
            return self.uniform(like, eps)
        if dist == "gaussian":
            z = torch.randn_like(like)
            return z * eps / self.norm(z).clamp_min(1e-12).view_as(eps)
        raise ValueError(f"dist must be 'uniform' or 'gaussian', got {dist!r}")


@dataclasses.dataclass(frozen=True)
class Linf(LpNorm):
    """L-infinity: sign steps (FGSM/PGD, Goodfellow et al. 2015, Madry et al. 2018), clipping projection."""

    name: str = "linf"

    def norm(self, v: Tensor) -> Tensor:
        return _flat(v).abs().amax(dim=1)

    def step(self, grad: Tensor, alpha: Tensor, x_cur: Tensor) -> Tensor:
        return alpha * grad.sign()

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(delta, eps), -eps)

    def uniform(self, like: Tensor, eps: Tensor) -> Tensor:
        return (2 * torch.rand_like(like) - 1) * eps


def _uniform_lp_ball(like: Tensor, eps: Tensor, p: int) -> Tensor:
    """Uniform in the unit Lp ball (Barthe et al. 2005): X_i with density ~exp(-|t|^p), W ~ Exp(1),
    then X / (sum |X_i|^p + W)^(1/p); p = 1 uses Laplace, p = 2 uses N(0, 1/2)."""
    if p == 1:
        z = torch.empty_like(like).exponential_() * torch.randn_like(like).sign()  # Laplace(0, 1)
    else:
        z = torch.randn_like(like) / math.sqrt(2.0)
    w = torch.empty(like.shape[0], device=like.device, dtype=like.dtype).exponential_()
    denom = (_flat(z).abs().pow(p).sum(dim=1) + w).pow(1.0 / p)
    return z / denom.view_as(eps) * eps


@dataclasses.dataclass(frozen=True)
class L2(LpNorm):
    """L2: normalized-gradient steps (PGD-L2, Madry et al. 2018), radial projection."""

    name: str = "l2"

    def norm(self, v: Tensor) -> Tensor:
        return _flat(v).norm(dim=1)

    def step(self, grad: Tensor, alpha: Tensor, x_cur: Tensor) -> Tensor:
        return alpha * grad / self.norm(grad).clamp_min(1e-12).view_as(alpha)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        scale = (eps / self.norm(delta).clamp_min(1e-12).view_as(eps)).clamp(max=1.0)
        return delta * scale

    def uniform(self, like: Tensor, eps: Tensor) -> Tensor:
        return _uniform_lp_ball(like, eps, 2)


@dataclasses.dataclass(frozen=True)
class L1(LpNorm):
    """L1: sparse steepest ascent (SLIDE, Tramer & Boneh 2019; Maini et al. 2020's step).

    A step moves only the coordinates whose |gradient| is in the top ``1 - sparsity`` fraction
    (at least one), by the gradient's sign, skipping coordinates at the [0, 1] boundary that the
    step would push outward; the step has L1 norm ``alpha``.
    """

    sparsity: float = 0.99
    name: str = "l1"

    def norm(self, v: Tensor) -> Tensor:
        return _flat(v).abs().sum(dim=1)

    def step(self, grad: Tensor, alpha: Tensor, x_cur: Tensor) -> Tensor:
        g, xc = _flat(grad), _flat(x_cur)  # (B, D)
        blocked = ((g > 0) & (xc >= 1)) | ((g < 0) & (xc <= 0))
        g = g.masked_fill(blocked, 0.0)
        k = max(1, math.ceil((1.0 - self.sparsity) * g.shape[1]))
        idx = g.abs().topk(k, dim=1).indices
        e = torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx).sign())  # zero-gradient picks add 0
        e = e / e.abs().sum(dim=1, keepdim=True).clamp_min(1.0)
        return alpha * e.view_as(grad)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        return project_l1(delta, eps)

    def uniform(self, like: Tensor, eps: Tensor) -> Tensor:
        return _uniform_lp_ball(like, eps, 1)


def project_l1(delta: Tensor, eps: Tensor) -> Tensor:
    """Exact Euclidean projection of each example onto the L1 ball of radius eps (Duchi et al. 2008).

    Sort |v| descending, find the largest rho with u_rho > (sum_{j<=rho} u_j - eps) / rho, soft-threshold
    at theta = (sum_{j<=rho} u_j - eps) / rho. Computed in float64 (except on MPS) so the result's
    norm is eps up to float rounding of the output dtype.
    """
    b = delta.shape[0]
    work = torch.float32 if delta.device.type == "mps" else torch.float64
    v = _flat(delta).to(work)
    r = eps.reshape(b, 1).to(work)
    a = v.abs()
    inside = a.sum(dim=1, keepdim=True) <= r
    u = a.sort(dim=1, descending=True).values
    css = u.cumsum(dim=1)
    j = torch.arange(1, u.shape[1] + 1, device=v.device, dtype=work)
    rho = (u * j > css - r).sum(dim=1, keepdim=True).clamp_min(1)  # condition holds on a prefix
    theta = (css.gather(1, rho - 1) - r) / rho.to(work)
    w = v.sign() * (a - theta).clamp_min(0.0)
    return torch.where(inside, v, w).to(delta.dtype).view_as(delta)


@dataclasses.dataclass(frozen=True)
class L0(LpNorm):
    """L0 over pixels: at most ``eps`` pixel locations change (all channels of a pixel count as one).

    A step moves every coordinate by ``alpha`` times its gradient divided by the example's largest
    |gradient| (so the steepest coordinate moves ``alpha``); the projection keeps the ``eps`` pixels
    whose perturbation is largest (summed over channels), as projected PGD-L0 (Croce & Hein 2019).
    """

    name: str = "l0"

    def norm(self, v: Tensor) -> Tensor:
        return (v.abs().sum(dim=1).flatten(1) > 0).sum(dim=1).to(v.dtype)

    def step(self, grad: Tensor, alpha: Tensor, x_cur: Tensor) -> Tensor:
        return alpha * grad / _flat(grad).abs().amax(dim=1).clamp_min(1e-12).view_as(alpha)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        score = delta.abs().sum(dim=1).flatten(1)  # (B, H*W)
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)
        keep = (rank < eps.reshape(-1, 1)) & (score > 0)
        return delta.clamp(-1, 1) * keep.view(delta.shape[0], 1, *delta.shape[2:]).to(delta.dtype)

    def uniform(self, like: Tensor, eps: Tensor) -> Tensor:
        return self.project(2 * torch.rand_like(like) - 1, eps)  # random values at eps random pixels


NORMS: dict[str, LpNorm] = {"linf": Linf(), "l2": L2(), "l1": L1()}
