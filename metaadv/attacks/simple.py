"""Baselines that ignore the model: ``none`` (clean images) and ``noise`` (random point in an Lp ball)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..types import ModelFn
from .norms import NORMS, per_example
from .registry import register

__all__ = ["noise", "none"]


@register("none", norm=None)
def none(model_fn: ModelFn, x: Tensor, y: Tensor) -> Tensor:
    """No attack: a copy of the images (B, C, H, W) in [0, 1]; the clean-accuracy baseline."""
    return x.detach().clone()


@register("noise", norm=lambda p: p["norm"])
def noise(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    dist: Literal["uniform", "gaussian"] = "uniform",
    norm: Literal["linf", "l2", "l1"] = "linf",
) -> Tensor:
    """Random perturbation in the ``norm`` ball of radius ``eps``, then clipped to [0, 1].

    ``dist="uniform"``: uniform over the ball's volume (for Linf, each pixel uniform in [-eps, eps]);
    ``dist="gaussian"``: a Gaussian direction scaled to the ball's surface (norm exactly eps).
    The baseline an attack must beat; ``eps`` may be a float or a (B,) tensor. Does not call the model.
    """
    delta = NORMS[norm].sample(x, per_example(eps, x), dist)
    return (x.detach() + delta).clamp(0, 1)
