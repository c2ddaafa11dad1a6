"""MSD, multi steepest descent (Maini et al. 2020): one attack against the union of the Linf, L2 and L1 balls.

Maini, Wong & Kolter, "Adversarial Robustness Against the Union of Multiple Perturbation Models",
ICML 2020 (reference code: locuslab/robust_union, ``msd_v0``). Each step takes the steepest-ascent
step of every norm from the current perturbation, projects each candidate onto its own ball and
[0, 1], and keeps per example the candidate with the highest loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ModelFn
from .norms import L1, NORMS, LpNorm, per_example
from .registry import positive, register
from .steepest import _sparsity

__all__ = ["msd"]


def _balls(
    x: Tensor,
    eps: dict[str, float | Tensor | None],
    alpha: dict[str, float | Tensor | None],
    sparsity: float,
    steps: int,
) -> list[tuple[LpNorm, Tensor, Tensor]]:
    """(norm, eps (B, 1, 1, 1), alpha (B, 1, 1, 1)) for each norm whose eps is set, in the order Linf, L2, L1."""
    norms = {"linf": NORMS["linf"], "l2": NORMS["l2"], "l1": L1(sparsity)}
    out = []
    for name, e in eps.items():
        if e is None:
            continue
        a = alpha[name] if alpha[name] is not None else 2.5 * e / steps  # the default of pgd_linf/l2/l1
        out.append((norms[name], per_example(e, x), per_example(a, x)))
    if not out:
        raise ValueError("msd needs at least one of eps_linf, eps_l2, eps_l1 (the balls of the union), got all None")
    return out


@register(
    "msd",
    norm=None,
    checks={
        **dict.fromkeys(("eps_linf", "eps_l2", "eps_l1", "alpha_linf", "alpha_l2", "alpha_l1"), positive),
        "l1_sparsity": _sparsity,
    },
)
@torch.enable_grad()
def msd(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps_linf: float | Tensor | None = 0.3,
    eps_l2: float | Tensor | None = 2.0,
    eps_l1: float | Tensor | None = 10.0,
    steps: int = 10,
    alpha_linf: float | Tensor | None = None,
    alpha_l2: float | Tensor | None = None,
    alpha_l1: float | Tensor | None = None,
    l1_sparsity: float = 0.99,
    random_start: bool = False,
) -> Tensor:
    """MSD (Maini et al. 2020): steepest ascent on the cross-entropy over the union of Linf, L2 and L1 balls.

    Each of ``steps`` steps computes the gradient at the current perturbation ``delta``, then for
    each norm the candidate ``project_ball(delta + step_norm(grad))``, projected onto [0, 1]; each
    example keeps the candidate with the highest loss. The result is, per example, the iterate with
    the highest loss seen (as the reference code returns). Each example's perturbation therefore
    lies in at least one of the balls (the union, not the intersection) and x_adv in [0, 1].

    Args:
        eps_linf, eps_l2, eps_l1: radii of the balls (pixel scale [0, 1]; floats or (B,) tensors at
            call time). ``None`` leaves that norm out of the union; at least one must be set.
            Defaults are the MNIST values of the paper.
        steps: MSD iterations (the paper: 100 on MNIST, 50 on CIFAR-10).
        alpha_linf, alpha_l2, alpha_l1: step sizes in each norm; default 2.5 * eps / steps, as
            pgd_linf / pgd_l2 / pgd_l1 (the paper's MNIST values: 0.01, 0.1, 1.0 with 100 steps).
        l1_sparsity: the L1 step moves the top ``1 - l1_sparsity`` fraction of coordinates, as pgd_l1
            (the reference code moves a random 5 to 20 coordinates).
        random_start: start from a random point of the intersection of the balls (uniform in Linf,
            scaled into the L2 and L1 balls, as the reference code); default zero start, as the
            reference's MNIST training.

    Shapes: x (B, C, H, W) in [0, 1], y (B,). Returns x_adv (B, C, H, W).
    """
    x = x.detach()
    balls = _balls(
        x,
        {"linf": eps_linf, "l2": eps_l2, "l1": eps_l1},
        {"linf": alpha_linf, "l2": alpha_l2, "l1": alpha_l1},
        l1_sparsity,
        steps,
    )
    delta = torch.zeros_like(x)
    if random_start:
        delta = NORMS["linf"].uniform(x, balls[0][1])  # the Linf ball if it is in the union
        for norm, eps, _ in balls:  # radial scaling into each ball keeps it in the balls already reached
            delta = delta * (eps / norm.norm(delta).clamp_min(1e-12).view_as(eps)).clamp(max=1.0)
        delta = (x + delta).clamp(0, 1) - x
    rows = torch.arange(x.shape[0], device=x.device)
    best, best_loss = x + delta, torch.full((x.shape[0],), -float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model_fn(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach()
        candidates = []
        for norm, eps, alpha in balls:
            d = norm.project(delta + norm.step(grad, alpha, x + delta), eps)
            candidates.append((x + d).clamp(0, 1) - x)  # [0, 1]; clipping only shrinks |d_i|: stays in the ball
        stacked = torch.stack(candidates)  # (N, B, C, H, W)
        with torch.no_grad():
            losses = torch.stack([F.cross_entropy(model_fn(x + d), y, reduction="none") for d in candidates])  # (N, B)
        step_loss, pick = losses.max(0)  # per example: the norm whose candidate has the highest loss
        delta = stacked[pick, rows]
        better = step_loss > best_loss
        best = torch.where(better.view(-1, 1, 1, 1), x + delta, best)
        best_loss = torch.where(better, step_loss, best_loss)
    return best.clamp(0, 1)
