"""TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``, x_adv maximizing the KL in
one Lp ball, crafted in eval mode as the reference code (yaodongyu/TRADES)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import Attack
from ..attacks.norms import L1, NORMS, per_example
from ..functional import ModelFn, eval_mode, model_fn, state
from .adversarial import Baseline, Weight


def check_lp(attacks: list[Attack]) -> list[Attack]:
    """The one attack must be an Lp attack with an eps: its norm, eps, ``steps`` (default 1) and ``alpha``
    (default 2.5 * eps / steps) set TRADES's own KL ascent."""
    if attacks[0].norm is None or attacks[0].eps is None:
        raise ValueError(
            f"method 'trades' takes one Lp attack with an eps, e.g. 'pgd_linf(eps=0.3, steps=10)'; got {attacks[0]}"
        )
    return attacks


def kl_ascent(target: ModelFn, x: Tensor, attack: Attack) -> Tensor:
    """TRADES's inner maximization: steepest ascent on KL(f(x) || f(x_adv)) in ``attack``'s ball, from
    x + 0.001 * N(0, 1) (at x itself the KL's gradient is zero); projected onto the ball and [0, 1] each step."""
    p = attack.params
    norm = L1(p.get("sparsity", 0.99)) if attack.norm == "l1" else NORMS[attack.norm]  # type: ignore[index]
    steps = int(p.get("steps", 1))
    eps = per_example(attack.eps, x)  # type: ignore[arg-type]
    alpha = per_example(p["alpha"], x) if p.get("alpha") is not None else 2.5 * eps / steps
    with torch.no_grad():
        log_p = F.log_softmax(target(x), dim=1)  # (B, K), the fixed clean prediction
    delta = norm.project(0.001 * torch.randn_like(x), eps)
    delta = (x + delta).clamp(0, 1) - x
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(target(x + delta), dim=1), log_p, reduction="sum", log_target=True)
            (grad,) = torch.autograd.grad(kl, delta)
            delta = norm.project(delta.detach() + norm.step(grad, alpha, x + delta.detach()), eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).clamp(0, 1).detach()


def trades_loss(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-example TRADES loss (B,): ``CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))``.

    x_adv is crafted in eval mode (running BatchNorm statistics), as the reference code (Zhang et al.
    2019, yaodongyu/TRADES); the clean and adversarial forwards then run in the model's own mode,
    separately, and the gradient flows through both sides of the KL, as in the reference.
    """
    params, buffers = state(model)
    with eval_mode(model):
        x_adv = kl_ascent(model_fn(model, params, buffers), x, attack)
    logits = model(x)  # (B, K)
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(model(x_adv), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)  # (B,)
    return F.cross_entropy(logits, y, reduction="none") + beta * kl


def _loss(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor, settings: Mapping[str, float]) -> Tensor:
    return trades_loss(model, attacks[0], x, y, settings["beta"])


# beta: the KL term's weight (the paper's 1/lambda); no clean_weight, the loss has its clean term
BASELINE = Baseline("trades", "CE on clean data + beta * KL to one Lp attack's prediction (Zhang et al. 2019)",
                    (1, 1), _loss, settings={"beta": Weight(6.0)}, check=check_lp)  # fmt: skip
