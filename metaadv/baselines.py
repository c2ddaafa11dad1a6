"""The methods users compare meta-adversarial training against, on the same ``fit`` loop.

- ``"erm"``: standard training on clean data.
- ``"pgd_at"``: adversarial training on one attack (Madry et al. 2018); ``clean_weight=0.5`` gives the
  50/50 clean + adversarial variant; with ``fgsm_rs`` it is fast adversarial training (Wong et al. 2020).
- ``"avg"`` / ``"max"``: multi-attack training (Tramer & Boneh 2019): the loss averaged over the attacks,
  or per example the worst attack's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .attacks import Attack, make
from .functional import model_fn, state
from .trainer import TrainResult, fit, make_optimizer, resolve_device, training_tensors

__all__ = ["METHODS", "adversarial_train"]

METHODS = ("erm", "pgd_at", "avg", "max")


def adversarial_loss(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor, method: str) -> Tensor:
    """Per-example loss (B,) of ``method`` on the batch; attacks are crafted against the current model."""
    if method == "erm":
        return F.cross_entropy(model(x), y, reduction="none")
    params, buffers = state(model)
    target = model_fn(model, params, buffers)  # scratch BN statistics while attacking
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
    epochs: int = 3,
    steps: int | None = None,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place with a baseline method; returns ``TrainResult`` (history has ``loss``).

    ``attacks``: none for ``"erm"``, exactly one for ``"pgd_at"``, one or more for ``"avg"``/``"max"``.
    ``clean_weight`` w mixes the loss as ``(1-w) * L_adv + w * L_clean``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    resolved = [make(a) for a in attacks]
    expected = {"erm": (0, 0), "pgd_at": (1, 1), "avg": (1, None), "max": (1, None)}[method]
    if len(resolved) < expected[0] or (expected[1] is not None and len(resolved) > expected[1]):
        raise ValueError(f"method {method!r} takes {expected} attacks (min, max), got {len(resolved)}")
    if not 0 <= clean_weight <= 1:
        raise ValueError(f"clean_weight must be in [0, 1], got {clean_weight!r}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model.to(dev)
    x, y = training_tensors(model, train_data, dev)
    opt = make_optimizer(model.parameters(), optimizer, lr)

    def step(xb: Tensor, yb: Tensor) -> dict[str, Any]:
        loss = adversarial_loss(model, resolved, xb, yb, method).mean()
        if clean_weight > 0 and method != "erm":
            loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    return fit(
        model, x, y, step, batch_size=batch_size, epochs=epochs, steps=steps, seed=seed, progress=progress,
        desc=method,
    )  # fmt: skip
