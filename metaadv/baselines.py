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
- ``"ramp"``: RAMP (Jiang & Singh, NeurIPS 2024, "RAMP: Boosting Adversarial Robustness Against Multiple
  l_p Perturbations", arXiv 2402.06827; code: github.com/uiuc-focal-lab/RAMP):
  MAX over the batch's two strongest attacks, a logit-pairing KL term, and gradient projection (GP)
  toward the clean-training gradient. Below.

Attacks are crafted against the current model with scratch BatchNorm statistics (``model_fn``), in the
model's current mode (training mode inside ``fit``); TRADES crafts in eval mode, as its reference code.

RAMP, as implemented here. Per batch (x, y) of size B, every attack a_1..a_A (A >= 2) is crafted; the two
strongest on this batch are kept: r, the one with the lowest accuracy (ties: highest mean cross-entropy)
and q, the next one. With z_q = f(x_q), z_r = f(x_r) (one training forward over both sets), p = softmax z:

    L = 1/B sum_i max(CE(z_q,i, y_i), CE(z_r,i, y_i))  +  lambda / n_c * sum_{i in C} KL(p_q,i || p_r,i),
    C = {i : argmax z_q,i = y_i},  n_c = |C|  (the KL term is 0 when C is empty),

the gradient flowing through both sides of the KL. Then gradient projection, per parameter tensor l, with
g_a = dL/dtheta_l and g_n = dCE(f(x), y)/dtheta_l the clean-training gradient on the same clean batch:

    g_l = (1 - beta) * g_a + beta * max(cos(g_a, g_n), 0) * g_n,

and the optimizer steps on g. Defaults: lambda = 5 and beta = 0.5, as their CIFAR-10 training-from-scratch
runs (``RAMP_scratch_cifar10.sh``: ``--lbd 5``; beta 0.5 is fixed in their ``RAMP.py``).
What we kept, changed and dropped from the paper's code, and why:

- kept: MAX over the pair (their ``--max``), the KL direction KL(p_q || p_r) restricted to the examples
  the q-attack leaves correct, summed and divided by their count (their ``--kl``), lambda's scale, the GP
  formula (the per-tensor cosine, clipped at 0, times the raw clean update, and the (1 - beta) weight).
- changed, the pair: their code fixes it (q = Linf, r = L1, the "key trade-off pair" the paper identifies
  on CIFAR-10); we identify it as the two strongest attacks, per batch, for any attack list (non-Lp
  families included). q is the weaker of the two, as their Linf is for an Linf-robust model being fine-tuned on
  L1: the predictions under the strongest attack are pulled toward those the model still gets right.
  Picking the pair means crafting every attack, as MAX does; with two attacks nothing is dropped.
- changed, the max: per example the larger cross-entropy of the training forward, not APGD's best loss
  measured in eval mode; one forward over both sets (BatchNorm statistics over 2B examples), not three.
- changed, crafting: our attacks (whatever specs are given, e.g. PGD) crafted in the model's mode with
  scratch BatchNorm statistics, like the other baselines here, instead of APGD in eval mode.
- changed, GP: theirs trains a separate clean model for a whole epoch with its own SGD optimizer, then fuses
  the epoch's parameter deltas (theta_nat - theta_old and theta_adv - theta_old) with the formula above,
  BatchNorm running statistics included. Ours applies the same formula every step to the two gradients at
  the current parameters (g_n from one extra clean forward/backward on the batch's clean images, with
  scratch BatchNorm statistics), before the optimizer: no second model, optimizer or training loop, and
  the run checkpoints and resumes like the others. So the clean direction is one batch's gradient, not an
  epoch of momentum SGD; the running statistics come from the adversarial forward alone (not fused).
  ``ramp_beta=0`` turns GP off (g = g_a); ``clean_weight`` still mixes a clean term into L before GP.
- dropped: clean pre-training (their ``--pretraining``), the MSE/cosine pairing variants, the 1e-12 added
  to the logits, and their learning-rate schedule and weight decay (every method here shares ``fit``'s
  optimizer and lr).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .attacks import Attack, make
from .attacks.norms import L1, NORMS, per_example
from .functional import ModelFn, call, clone_buffers, eval_mode, model_fn, state
from .config import LoopConfig
from .engine import StepOutput, Trainable, TrainResult, fit, make_optimizer, resolve_device, training_tensors
from .engine.resume import Checkpointing

__all__ = ["METHODS", "adversarial_loss", "adversarial_train", "gradient_projection", "ramp_loss", "training_attacks"]

METHODS = ("erm", "pgd_at", "fast_at", "avg", "max", "msd", "trades", "sat", "ramp")
_COUNTS = {"erm": (0, 0), "pgd_at": (1, 1), "fast_at": (1, 1), "avg": (1, None), "max": (1, None)}
_COUNTS |= {"msd": (1, None), "trades": (1, 1), "sat": (2, None), "ramp": (2, None)}  # (min, max) number of attacks


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
    if method == "ramp" and len({a.spec for a in resolved}) < len(resolved):
        raise ValueError(
            f"method 'ramp' pairs different attacks; an attack is listed twice: {[a.spec for a in resolved]}"
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


def _strongest_pair(target: ModelFn, advs: Sequence[Tensor], y: Tensor) -> tuple[int, int]:
    """Indices ``(q, r)`` of the two strongest attacks on this batch: ``r`` leaves the lowest accuracy (ties:
    the highest mean cross-entropy), ``q`` the next. ``advs``: A tensors (B, C, H, W) crafted against ``target``."""
    with torch.no_grad():
        scores = []
        for x_adv in advs:
            logits = target(x_adv)  # (B, K)
            scores.append(torch.stack([(logits.argmax(1) == y).float().mean(), -F.cross_entropy(logits, y)]))
        ranked = sorted(range(len(advs)), key=torch.stack(scores).tolist().__getitem__)
    return ranked[1], ranked[0]


def ramp_loss(model: nn.Module, target: ModelFn, advs: Sequence[Tensor], y: Tensor, lam: float) -> Tensor:
    """Per-example RAMP loss (B,), whose mean is RAMP's batch loss (module docstring):
    ``max(CE(f(x_q), y), CE(f(x_r), y)) + lam * B / n_c * 1[f(x_q) correct] * KL(p_q || p_r)``.

    ``advs``: two or more adversarial batches (B, C, H, W) crafted against ``target`` (the model with
    scratch BatchNorm statistics), which also ranks them: (q, r) are this batch's two strongest, r the
    strongest. Then one forward of ``model`` over both sets, in its own mode.
    """
    q, r = _strongest_pair(target, advs, y)
    logits = model(torch.cat([advs[q], advs[r]]))  # (2B, K): BN statistics over both sets
    ce = F.cross_entropy(logits, y.repeat(2), reduction="none").view(2, -1).max(0).values  # (B,)
    log_q, log_r = F.log_softmax(logits, dim=1).view(2, len(y), -1)  # (B, K) each
    kl = (log_q.exp() * (log_q - log_r)).sum(1)  # (B,) KL(p_q || p_r), gradient through both sides
    correct = (log_q.argmax(1) == y).detach()  # C: the examples the q-attack leaves correct
    weight = correct.float() * (len(y) / correct.sum().clamp(min=1))  # mean over the batch = sum over C / n_c
    return ce + lam * weight * kl


def gradient_projection(g_adv: Sequence[Tensor], g_nat: Sequence[Tensor], beta: float) -> tuple[list[Tensor], Tensor]:
    """RAMP's GP per tensor: ``(1 - beta) * g_a + beta * max(cos(g_a, g_n), 0) * g_n``.

    ``g_adv``, ``g_nat``: gradients (or updates) of the same parameter tensors, pairwise of equal shapes.
    Returns the combined tensors and the cosines (L,) (0 where either tensor is zero).
    """
    combined, cosines = [], []
    for a, n in zip(g_adv, g_nat, strict=True):
        cos = F.cosine_similarity(a.flatten(), n.flatten(), dim=0)
        combined.append((1 - beta) * a + beta * cos.clamp(min=0) * n)
        cosines.append(cos)
    return combined, torch.stack(cosines)


def _project_on_clean(model: nn.Module, loss: Tensor, x: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``loss``'s stand-in for the update: same value, gradient GP(dloss/dtheta, dCE(f(x), y)/dtheta) (see
    :func:`gradient_projection`); the clean forward uses scratch BatchNorm statistics. Returns it and the
    mean cosine over the parameter tensors."""
    params, buffers = state(model)
    theta = [p for p in params.values() if p.requires_grad]

    def grads(value: Tensor) -> list[Tensor]:
        gs = torch.autograd.grad(value, theta, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(theta, gs, strict=True)]

    g_adv = grads(loss)
    g_nat = grads(F.cross_entropy(call(model, params, clone_buffers(buffers), x), y))
    combined, cosines = gradient_projection(g_adv, g_nat, beta)
    linear = sum((g * p).sum() for g, p in zip(combined, theta, strict=True))  # d/dtheta = combined
    return loss.detach() + (linear - linear.detach()), cosines.mean()


def adversarial_loss(
    model: nn.Module,
    attacks: Sequence[str | Attack],
    x: Tensor,
    y: Tensor,
    method: str,
    *,
    beta: float = 6.0,
    ramp_lambda: float = 5.0,
) -> Tensor:
    """Per-example loss (B,) of ``method`` on the batch; attacks are crafted against the current model.

    ``attacks`` as :func:`adversarial_train` takes them (checked by :func:`training_attacks`);
    ``beta`` is TRADES's weight of the KL term, ``ramp_lambda`` RAMP's (other methods ignore them).
    RAMP's gradient projection acts on the update, not the loss: see :func:`adversarial_train`.
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
    if method == "ramp":
        return ramp_loss(model, target, advs, y, ramp_lambda)
    logits = model(torch.cat(advs))  # one forward: BN statistics over all adversarial examples
    losses = F.cross_entropy(logits, y.repeat(len(advs)), reduction="none").view(len(advs), -1)  # (A, B)
    return losses.max(0).values if method == "max" else losses.mean(0)


def _check_weight(name: str, value: object, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= high and value < math.inf):
        raise ValueError(f"{name} must be {'in [0, 1]' if high == 1 else 'a finite number >= 0'}, got {value!r}")


def adversarial_train(
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: Sequence[str | Attack] = (),
    *,
    method: str = "pgd_at",
    clean_weight: float = 0.0,
    beta: float = 6.0,
    ramp_lambda: float = 5.0,
    ramp_beta: float = 0.5,
    epochs: int = 3,
    steps: int | None = None,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
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
        ``"ramp"`` (Jiang & Singh 2024): two or more different attacks, of any kind; each batch pairs its
        two strongest (module docstring), e.g. ``["pgd_linf(eps=0.3, steps=10)", "pgd_l1(eps=10.0, steps=10)"]``.
    ``clean_weight`` w mixes the loss as ``(1-w) * L_adv + w * L_clean`` (not for ``"trades"``, whose
    clean term is built in). ``beta``: TRADES's weight of the KL term (default 6.0, the paper's 1/lambda).
    ``ramp_lambda`` (>= 0, default 5.0): RAMP's weight of the logit-pairing KL. ``ramp_beta`` (in [0, 1],
    default 0.5): RAMP's gradient projection weight; each step the update is
    ``(1 - ramp_beta) * g_adv + ramp_beta * max(cos, 0) * g_clean`` per parameter tensor (0: plain g_adv),
    at the cost of one clean forward/backward; the mean cosine is logged as ``gp_cos``.

    ``checkpoint_dir``, ``checkpoint_every``, ``keep_last``, ``resume`` and ``max_bad_steps`` work as in
    ``meta_train``: exact resume after an interruption, and a step with a non-finite loss or gradient is
    skipped (``max_bad_steps`` consecutive ones raise ``NonFiniteLossError``).
    """
    resolved = training_attacks(method, attacks)
    if not 0 <= clean_weight <= 1:
        raise ValueError(f"clean_weight must be in [0, 1], got {clean_weight!r}")
    if method == "trades" and clean_weight > 0:
        raise ValueError("clean_weight does not apply to method 'trades' (its loss has a clean term); set beta instead")
    _check_weight("beta", beta)
    _check_weight("ramp_lambda", ramp_lambda)
    _check_weight("ramp_beta", ramp_beta, high=1.0)
    loop = LoopConfig(epochs=epochs, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, seed=seed, device=device, max_bad_steps=max_bad_steps)  # fmt: skip
    checkpointing = Checkpointing(checkpoint_dir, checkpoint_every, keep_last, resume)
    dev = resolve_device(loop.device)
    torch.manual_seed(loop.seed)
    model.to(dev)
    x, y = training_tensors(model, train_data, dev)
    opt = make_optimizer(model.parameters(), loop.optimizer, loop.lr, loop.weight_decay)

    def step(xb: Tensor, yb: Tensor, index: int) -> StepOutput:
        loss = adversarial_loss(model, resolved, xb, yb, method, beta=beta, ramp_lambda=ramp_lambda).mean()
        if clean_weight > 0 and method != "erm":
            loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(xb), yb)
        if method == "ramp" and ramp_beta > 0:
            loss, cos = _project_on_clean(model, loss, xb, yb, ramp_beta)
            return StepOutput(loss, {"gp_cos": cos})
        return StepOutput(loss)

    run = {"method": method, "attacks": [a.spec for a in resolved], "clean_weight": clean_weight, "beta": beta,
           "optimizer": optimizer, "lr": lr, "model": type(model).__name__}  # fmt: skip
    if method == "ramp":  # recorded for ramp only, so checkpoints of the other methods still resume
        run |= {"ramp_lambda": ramp_lambda, "ramp_beta": ramp_beta}
    if weight_decay:
        run |= {"weight_decay": weight_decay}
    trainable = Trainable(model, opt, list(model.parameters()))
    return fit(trainable, x, y, step, loop, checkpointing=checkpointing, config=run, progress=progress, desc=method)
