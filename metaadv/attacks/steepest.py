"""The one steepest-ascent loop and its configurations: fgsm, fgsm_rs, pgd_linf, pgd_l2, pgd_l1, mifgsm, l0.

All take images in [0, 1] (B, C, H, W), labels (B,), maximize the cross-entropy (untargeted) and
return x_adv inside the eps ball of their norm and inside [0, 1]. ``eps`` (and ``alpha``) may be a
float or a per-example tensor of shape (B,); defaults that depend on eps scale per example.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ModelFn
from ..validation import check_int
from .compiled import loss_gradient
from .norms import L0, L1, NORMS, LpNorm, per_example
from .registry import register

__all__ = ["fgsm", "fgsm_rs", "l0", "mifgsm", "pgd_l1", "pgd_l2", "pgd_linf", "steepest_ascent"]


@torch.enable_grad()
def steepest_ascent(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    norm: LpNorm,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    restarts: int = 1,
    random_start: bool = True,
    momentum: float | None = None,
) -> Tensor:
    """Projected steepest ascent on the cross-entropy within the ``norm`` ball of radius ``eps``.

    Each step: gradient w.r.t. the perturbation only (``compiled.loss_gradient``: ``torch.autograd.grad``,
    eager or under ``torch.compile`` inside ``compiled_attacks``; the model's parameters get no ``.grad``),
    a step of size ``alpha`` in ``norm`` (on the momentum buffer ``g <- momentum * g + grad / mean|grad|``
    if ``momentum`` is set, as MI-FGSM), projection onto the ball, then onto [0, 1] — at every step, so no
    pixel gets stuck outside the image range.
    With ``restarts > 1`` each example keeps the restart that misclassifies it, else the one with
    the highest loss.

    Shapes: x (B, C, H, W) in [0, 1], y (B,); eps/alpha floats or (B,) tensors. Returns (B, C, H, W).
    """
    x = x.detach()
    eps_b, alpha_b = per_example(eps, x), per_example(alpha, x)  # (B, 1, 1, 1)
    best, best_loss, best_fooled = x, None, None
    for _ in range(restarts):
        delta = norm.sample(x, eps_b) if random_start else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        buffer = torch.zeros_like(x)
        for _ in range(steps):
            grad = loss_gradient(model_fn, x + delta, y)  # eager, or compiled under compiled_attacks()
            if momentum is not None:
                buffer = momentum * buffer + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                grad = buffer
            delta = norm.project(delta + norm.step(grad, alpha_b, x + delta), eps_b)
            delta = (x + delta).clamp(0, 1) - x  # project onto [0, 1] at every step
        x_adv = (x + delta).clamp(0, 1)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model_fn(x_adv)
            loss_i = F.cross_entropy(logits, y, reduction="none")
            fooled = logits.argmax(dim=1) != y
        if best_loss is None:
            best, best_loss, best_fooled = x_adv, loss_i, fooled
            continue
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss_i > best_loss))
        best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
        best_loss = torch.where(better, loss_i, best_loss)
        best_fooled = best_fooled | fooled
    return best


def _alpha(alpha: float | Tensor | None, eps: float | Tensor, factor: float) -> float | Tensor:
    return factor * eps if alpha is None else alpha


def _sparsity(label: str, value: Any) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{label} must be in [0, 1) (the fraction of coordinates left unchanged), got {value!r}")


@register("fgsm", norm="linf")
def fgsm(model_fn: ModelFn, x: Tensor, y: Tensor, *, eps: float | Tensor) -> Tensor:
    """FGSM (Goodfellow et al. 2015): one sign-gradient step of size eps; Linf ball."""
    return steepest_ascent(model_fn, x, y, norm=NORMS["linf"], eps=eps, alpha=eps, steps=1, random_start=False)


@register("fgsm_rs", norm="linf")
def fgsm_rs(
    model_fn: ModelFn, x: Tensor, y: Tensor, *, eps: float | Tensor, alpha: float | Tensor | None = None
) -> Tensor:
    """FGSM with random start (Wong et al. 2020, "Fast is better than free"); Linf ball.

    Uniform start in the eps ball, one sign step of ``alpha`` (default 1.25 * eps), projected back.
    """
    a = _alpha(alpha, eps, 1.25)
    return steepest_ascent(model_fn, x, y, norm=NORMS["linf"], eps=eps, alpha=a, steps=1, random_start=True)


@register("pgd_linf", norm="linf")
def pgd_linf(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    steps: int = 10,
    alpha: float | Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
) -> Tensor:
    """PGD in the Linf ball (Madry et al. 2018): uniform random start, ``steps`` sign steps of
    ``alpha`` (default 2.5 * eps / steps), projection onto the ball and [0, 1] after each."""
    a = _alpha(alpha, eps, 2.5 / steps)
    return steepest_ascent(
        model_fn,
        x,
        y,
        norm=NORMS["linf"],
        eps=eps,
        alpha=a,
        steps=steps,
        restarts=restarts,
        random_start=random_start,
    )


@register("pgd_l2", norm="l2")
def pgd_l2(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    steps: int = 10,
    alpha: float | Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
) -> Tensor:
    """PGD in the L2 ball (Madry et al. 2018): random start uniform in the ball, ``steps``
    normalized-gradient steps of L2 size ``alpha`` (default 2.5 * eps / steps), projection after each."""
    a = _alpha(alpha, eps, 2.5 / steps)
    return steepest_ascent(
        model_fn,
        x,
        y,
        norm=NORMS["l2"],
        eps=eps,
        alpha=a,
        steps=steps,
        restarts=restarts,
        random_start=random_start,
    )


@register("pgd_l1", norm="l1", checks={"sparsity": _sparsity})
def pgd_l1(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    steps: int = 10,
    alpha: float | Tensor | None = None,
    restarts: int = 1,
    random_start: bool = True,
    sparsity: float = 0.99,
) -> Tensor:
    """Sparse L1 descent (SLIDE; Tramer & Boneh 2019, step as in Maini et al. 2020) in the L1 ball.

    Each step moves the top ``1 - sparsity`` fraction of coordinates by |gradient| (skipping pixels
    at the [0, 1] boundary that the step would push outward), with L1 step size ``alpha``
    (default 2.5 * eps / steps), then projects exactly onto the L1 ball (Duchi et al. 2008) and
    [0, 1]. Random start uniform in the ball.
    """
    a = _alpha(alpha, eps, 2.5 / steps)
    return steepest_ascent(
        model_fn,
        x,
        y,
        norm=L1(sparsity),
        eps=eps,
        alpha=a,
        steps=steps,
        restarts=restarts,
        random_start=random_start,
    )


@register("mifgsm", norm="linf")
def mifgsm(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    steps: int = 10,
    alpha: float | Tensor | None = None,
    decay: float = 1.0,
) -> Tensor:
    """MI-FGSM (Dong et al. 2018): Linf sign steps on a momentum buffer of L1-normalized gradients,
    ``alpha`` default eps / steps, momentum ``decay``; starts at x."""
    a = _alpha(alpha, eps, 1.0 / steps)
    return steepest_ascent(
        model_fn, x, y, norm=NORMS["linf"], eps=eps, alpha=a, steps=steps, random_start=False, momentum=decay
    )


def _pixels(label: str, value: Any) -> None:
    check_int(value, label, meaning="pixels allowed to change")


@register("l0", norm=None, checks={"k": _pixels})
def l0(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    k: int,
    steps: int = 20,
    alpha: float = 0.5,
    restarts: int = 1,
    random_start: bool = True,
) -> Tensor:
    """Sparse attack: at most ``k`` pixels change (any amount within [0, 1]; all channels of a pixel
    count as one). Projected steepest ascent in L0 (Croce & Hein 2019's PGD-L0): gradient steps
    scaled so the steepest coordinate moves ``alpha``, then keep the ``k`` most-perturbed pixels."""
    return steepest_ascent(
        model_fn, x, y, norm=L0(), eps=float(k), alpha=alpha, steps=steps, restarts=restarts,
        random_start=random_start,
    )  # fmt: skip
