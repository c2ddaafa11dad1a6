"""The methods users compare meta-adversarial training against, on the same ``fit`` loop.

- ``"erm"``: standard training on clean data.
- ``"pgd_at"``: adversarial training on one attack (Madry et al. 2018); ``clean_weight=0.5`` gives the
  50/50 clean + adversarial variant.
- ``"fast_at"``: fast adversarial training (Wong et al. 2020): ``pgd_at`` on one ``fgsm_rs`` attack.
- ``"avg"`` / ``"max"``: multi-attack training (Tramer & Boneh 2019): the loss averaged over the attacks,
  or per example the worst attack's loss; the attacks may be of any norms.
- ``"msd"``: multi steepest descent (Maini et al. 2020): training on one attack against the union of
  the Linf, L2 and L1 balls, which at each step keeps per example the norm whose step raises the loss most.
- ``"trades"``: TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``, x_adv maximizing the KL.
- ``"sat"``: stochastic adversarial training (Croce & Hein 2022): each batch is trained on one of the attacks,
  drawn uniformly; with an Linf and an L1 attack it is their E-AT (the extreme norms, which also cover L2).

Attacks are crafted against the current model with scratch BatchNorm statistics (``model_fn``), in the
model's current mode (training mode inside ``fit``); TRADES crafts in eval mode, as its reference code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .attacks import Attack, make
from .attacks.norms import L1, NORMS, per_example
from .functional import eval_mode, model_fn, state
from .trainer import TrainResult, fit, make_optimizer, resolve_device, training_tensors, update_if_finite

__all__ = ["METHODS", "adversarial_loss", "adversarial_train", "training_attacks"]

METHODS = ("erm", "pgd_at", "fast_at", "avg", "max", "msd", "trades", "sat")
_COUNTS = {"erm": (0, 0), "pgd_at": (1, 1), "fast_at": (1, 1), "avg": (1, None), "max": (1, None)}
_COUNTS |= {"msd": (1, None), "trades": (1, 1), "sat": (2, None)}  # (min, max) number of attacks


def training_attacks(method: str, attacks: Sequence[str | Attack]) -> list[Attack]:
    """Check ``attacks`` for ``method`` and return the attacks it crafts; raises ValueError naming the problem.

    ``"msd"`` takes one ``msd(...)`` spec, or Lp attacks that define the union threat model: for each
    norm among them the largest eps, with the largest ``steps`` among them (1 for attacks without
    ``steps``, such as fgsm) and msd's default step sizes; they become one ``msd`` attack (pass an
    ``msd(...)`` spec to set step sizes). ``"trades"`` takes one Lp attack: its norm, eps, ``steps``
    (default 1) and ``alpha`` (default 2.5 * eps / steps) set TRADES's own KL ascent.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    resolved = [make(a) for a in attacks]
    lo, hi = _COUNTS[method]
    if len(resolved) < lo or (hi is not None and len(resolved) > hi):
        wanted = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise ValueError(
            f"method {method!r} takes {wanted} attack(s), got {len(resolved)}: {[a.spec for a in resolved]}"
        )
    if method == "fast_at" and resolved[0].name != "fgsm_rs":
        raise ValueError(
            f"method 'fast_at' is pgd_at with an fgsm_rs attack, e.g. 'fgsm_rs(eps=0.3)'; got {resolved[0]}"
        )
    if method == "trades" and (resolved[0].norm is None or resolved[0].eps is None):
        raise ValueError(
            f"method 'trades' takes one Lp attack with an eps, e.g. 'pgd_linf(eps=0.3, steps=10)'; got {resolved[0]}"
        )
    if method == "msd":
        return [_msd_attack(resolved)]
    return resolved


def _msd_attack(attacks: list[Attack]) -> Attack:
    if len(attacks) == 1 and attacks[0].name == "msd":
        return attacks[0]
    bad = [a.spec for a in attacks if a.norm is None or a.eps is None]
    if bad:
        raise ValueError(
            f"method 'msd' takes one msd(...) attack, or Lp attacks with an eps (pgd_linf, pgd_l2, pgd_l1, fgsm, ...) "
            f"whose union it attacks; got {bad}"
        )
    eps = {f"eps_{n}": max((a.eps for a in attacks if a.norm == n), default=None) for n in ("linf", "l2", "l1")}
    steps = max(int(a.params.get("steps", 1)) for a in attacks)
    return Attack("msd", {**eps, "steps": steps})


def _kl_ascent(target: Any, x: Tensor, attack: Attack) -> Tensor:
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
        x_adv = _kl_ascent(model_fn(model, params, buffers), x, attack)
    logits = model(x)  # (B, K)
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(model(x_adv), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)  # (B,)
    return F.cross_entropy(logits, y, reduction="none") + beta * kl


def adversarial_loss(
    model: nn.Module, attacks: Sequence[str | Attack], x: Tensor, y: Tensor, method: str, *, beta: float = 6.0
) -> Tensor:
    """Per-example loss (B,) of ``method`` on the batch; attacks are crafted against the current model.

    ``attacks`` as :func:`adversarial_train` takes them (checked by :func:`training_attacks`);
    ``beta`` is TRADES's weight of the KL term (other methods ignore it).
    """
    attacks = training_attacks(method, attacks)
    if method == "erm":
        return F.cross_entropy(model(x), y, reduction="none")
    if method == "trades":
        return trades_loss(model, attacks[0], x, y, beta)
    params, buffers = state(model)
    target = model_fn(model, params, buffers)  # scratch BN statistics while attacking
    if method == "sat":  # one threat model per batch, from the global RNG (checkpointed, so resume is exact)
        attacks = [attacks[int(torch.randint(len(attacks), ()))]]
    advs = [attack(target, x, y) for attack in attacks]
    logits = model(torch.cat(advs))  # one forward: BN statistics over all adversarial examples
    losses = F.cross_entropy(logits, y.repeat(len(advs)), reduction="none").view(len(advs), -1)  # (A, B)
    return losses.max(0).values if method == "max" else losses.mean(0)


def adversarial_train(
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: Sequence[str | Attack] = (),
    *,
    method: str = "pgd_at",
    clean_weight: float = 0.0,
    beta: float = 6.0,
    epochs: int = 3,
    steps: int | None = None,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    keep_last: int = 3,
    resume: bool | str | Path = False,
    max_bad_steps: int | None = 5,
) -> TrainResult:
    """Train ``model`` in place with a baseline method; returns ``TrainResult`` (history: ``loss``,
    ``grad_norm``, ``skipped``, ``bad_steps`` per step).

    ``method`` and its ``attacks``:
        ``"erm"``: none. ``"pgd_at"``: exactly one. ``"fast_at"``: one ``fgsm_rs`` (Wong et al. 2020).
        ``"avg"`` / ``"max"``: one or more, of any norms (Tramer & Boneh 2019).
        ``"msd"`` (Maini et al. 2020): one ``"msd(eps_linf=0.3, eps_l2=2.0, eps_l1=10.0, steps=...)"``,
        or Lp attacks whose union it attacks: per norm the largest eps, the largest ``steps``, msd's
        default step sizes (e.g. ``["pgd_linf(eps=0.3, steps=10)", "pgd_l2(eps=2.0, steps=10)"]``).
        ``"trades"`` (Zhang et al. 2019): one Lp attack giving the ball, ``steps`` and ``alpha`` of
        TRADES's KL ascent (e.g. ``"pgd_linf(eps=0.3, steps=10)"``); crafted in eval mode.
        ``"sat"`` (Croce & Hein 2022): two or more; each batch trains on one, drawn uniformly (E-AT:
        ``["pgd_linf(eps=0.3, steps=10)", "pgd_l1(eps=10.0, steps=10)"]``).
    ``clean_weight`` w mixes the loss as ``(1-w) * L_adv + w * L_clean`` (not for ``"trades"``, whose
    clean term is built in). ``beta``: TRADES's weight of the KL term (default 6.0, the paper's 1/lambda).

    ``checkpoint_dir``, ``checkpoint_every``, ``keep_last``, ``resume`` and ``max_bad_steps`` work as in
    ``meta_train``: exact resume after an interruption, and a step with a non-finite loss or gradient is
    skipped (``max_bad_steps`` consecutive ones raise ``NonFiniteLossError``).
    """
    resolved = training_attacks(method, attacks)
    if not 0 <= clean_weight <= 1:
        raise ValueError(f"clean_weight must be in [0, 1], got {clean_weight!r}")
    if method == "trades" and clean_weight > 0:
        raise ValueError("clean_weight does not apply to method 'trades' (its loss has a clean term); set beta instead")
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model.to(dev)
    x, y = training_tensors(model, train_data, dev)
    opt = make_optimizer(model.parameters(), optimizer, lr)
    params, buffers = state(model)

    def step(xb: Tensor, yb: Tensor) -> dict[str, Any]:
        before = {k: b.clone() for k, b in buffers.items()}  # put back if the step is skipped
        loss = adversarial_loss(model, resolved, xb, yb, method, beta=beta).mean()
        if clean_weight > 0 and method != "erm":
            loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(xb), yb)
        (value, grad_norm), skipped = update_if_finite(opt, loss, params.values(), buffers, before)
        return {"loss": value, "grad_norm": grad_norm, "skipped": skipped}

    run = {"method": method, "attacks": [a.spec for a in resolved], "clean_weight": clean_weight, "beta": beta,
           "optimizer": optimizer, "lr": lr, "model": type(model).__name__}  # fmt: skip
    return fit(
        model, x, y, step, batch_size=batch_size, epochs=epochs, steps=steps, seed=seed, progress=progress,
        desc=method, state={"optimizer": opt}, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        keep_last=keep_last, resume=resume, max_bad_steps=max_bad_steps, config=run,
    )  # fmt: skip
