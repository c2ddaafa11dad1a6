"""RAMP (Jiang & Singh, NeurIPS 2024, "RAMP: Boosting Adversarial Robustness Against Multiple l_p
Perturbations", arXiv 2402.06827; code: github.com/uiuc-focal-lab/RAMP): MAX over the batch's two strongest
attacks, a logit-pairing KL term, and gradient projection (GP) toward the clean-training gradient.

As implemented here: per batch (x, y) of size B, every attack a_1..a_A (A >= 2) is crafted; the two
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

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import Attack
from ..engine import StepOutput
from ..functional import ModelFn, call, clone_buffers, model_fn, state
from .adversarial import CLEAN, Baseline, Weight


def check_distinct(attacks: list[Attack]) -> list[Attack]:
    """RAMP pairs different attacks: none may be listed twice."""
    if len({a.spec for a in attacks}) < len(attacks):
        raise ValueError(
            f"method 'ramp' pairs different attacks; an attack is listed twice: {[a.spec for a in attacks]}"
        )
    return attacks


def strongest_pair(target: ModelFn, advs: Sequence[Tensor], y: Tensor) -> tuple[int, int]:
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
    q, r = strongest_pair(target, advs, y)
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


def _loss(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor, settings: Mapping[str, float]) -> Tensor:
    params, buffers = state(model)
    target = model_fn(model, params, buffers)  # scratch BN statistics while attacking
    return ramp_loss(
        model, target, [attack(target, x, y, check=False) for attack in attacks], y, settings["ramp_lambda"]
    )


def _update(model: nn.Module, loss: Tensor, x: Tensor, y: Tensor, settings: Mapping[str, float]) -> StepOutput:
    """GP on the update (``ramp_beta=0``: off); the mean cosine is logged as ``gp_cos``."""
    if settings["ramp_beta"] == 0:
        return StepOutput(loss)
    projected, cos = _project_on_clean(model, loss, x, y, settings["ramp_beta"])
    return StepOutput(projected, {"gp_cos": cos})


SETTINGS = {**CLEAN, "ramp_lambda": Weight(5.0), "ramp_beta": Weight(0.5, 1.0)}  # lambda, beta above
BASELINE = Baseline("ramp", "MAX over the two strongest attacks, logit pairing and GP (Jiang & Singh 2024)",
                    (2, None), _loss, settings=SETTINGS, check=check_distinct, update=_update)  # fmt: skip
