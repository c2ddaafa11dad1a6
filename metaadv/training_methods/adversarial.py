"""The one step and driver every baseline runs on the engine: ``Baseline`` (what a baseline's file defines:
its loss, attack check and settings) and ``fit_baseline``, which trains any of them with ``engine.fit``.

Attacks are crafted against the current model with scratch BatchNorm statistics (``model_fn``), in the
model's current mode (training mode inside ``fit``), unless a baseline's loss says otherwise (TRADES).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..attacks import Attack, make
from ..config import LoopConfig
from ..engine import StepFn, StepOutput, Trainable, TrainResult, fit
from ..engine.resume import Checkpointing
from ..engine.setup import deterministic_algorithms, make_optimizer, resolve_device, training_tensors
from ..engine.tensorboard import TensorBoardLogger
from ..functional import model_fn, state
from .method import Method

__all__ = ["CLEAN", "Baseline", "Weight", "attack_losses", "check_settings", "fit_baseline", "resolve_attacks"]

# (model, the checked attacks, x (B, C, H, W), y (B,), the settings with defaults filled) -> per-example loss (B,)
LossFn = Callable[[nn.Module, Sequence[Attack], Tensor, Tensor, Mapping[str, float]], Tensor]
# (model, the batch loss, x, y, settings) -> the step's output: how the loss becomes the update (RAMP's GP)
UpdateFn = Callable[[nn.Module, Tensor, Tensor, Tensor, Mapping[str, float]], StepOutput]


@dataclass(frozen=True)
class Weight:
    """A baseline's setting: a finite number in [0, high], and its default."""

    default: float
    high: float = math.inf


CLEAN = {"clean_weight": Weight(0.0, 1.0)}  # w: the step's loss is (1 - w) * L_adv + w * CE(f(x), y)


def _as_given(attacks: list[Attack]) -> list[Attack]:
    return attacks


@dataclass(frozen=True)
class Baseline:
    """One baseline method: what it adds to the shared step. A new baseline is one file defining one of these
    (``BASELINE``) plus its line in ``training_methods/__init__.py``."""

    name: str
    summary: str  # one line, with the paper
    attacks: tuple[int, int | None]  # (min, max) number of attacks; max None: no upper bound
    loss: LossFn
    settings: Mapping[str, Weight] = field(default_factory=lambda: dict(CLEAN))  # name -> its range and default
    check: Callable[[list[Attack]], list[Attack]] = _as_given  # its own attack check; returns the attacks crafted
    update: UpdateFn | None = None  # None: the optimizer steps on the loss's gradient

    @property
    def method(self) -> Method:
        """This baseline as a registry entry, trained by :func:`fit_baseline`."""
        defaults = {name: w.default for name, w in self.settings.items()}
        return Method(self.name, self.summary, self.attacks, partial(fit_baseline, self), defaults)


def resolve_attacks(baseline: Baseline, attacks: Sequence[str | Attack]) -> list[Attack]:
    """Check ``attacks`` for ``baseline`` and return the attacks it crafts; ValueError naming the problem."""
    if isinstance(attacks, (str, Attack)) or not isinstance(attacks, Sequence):
        raise TypeError(f"attacks must be a list of attack specs, e.g. ['pgd_linf(eps=0.3)'], got {attacks!r}")
    resolved = [make(a) for a in attacks]
    lo, hi = baseline.attacks
    if len(resolved) < lo or (hi is not None and len(resolved) > hi):
        wanted = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise ValueError(
            f"method {baseline.name!r} takes {wanted} attack(s), got {len(resolved)}: {[a.spec for a in resolved]}"
        )
    return baseline.check(resolved)


def check_settings(baseline: Baseline, settings: Mapping[str, Any]) -> dict[str, float]:
    """``settings`` with ``baseline``'s defaults filled in, each checked against its range (names it does
    not take are the registry's to reject)."""
    values = {name: settings.get(name, w.default) for name, w in baseline.settings.items()}
    for name, value in values.items():
        high = baseline.settings[name].high
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high or value == math.inf:
            allowed = f"in [0, {high:g}]" if high < math.inf else "a finite number >= 0"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return values


def attack_losses(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (A, B) of ``model`` on each attack's adversarial batch, crafted against the current model
    with scratch BatchNorm statistics; one forward over all A batches (BN statistics over A * B examples)."""
    params, buffers = state(model)
    target = model_fn(model, params, buffers)
    advs = [attack(target, x, y, check=False) for attack in attacks]  # the data is checked once
    logits = model(torch.cat(advs))  # (A * B, K)
    return F.cross_entropy(logits, y.repeat(len(advs)), reduction="none").view(len(advs), -1)


def adversarial_step(
    baseline: Baseline, model: nn.Module, attacks: list[Attack], settings: Mapping[str, float]
) -> StepFn:
    """The step every baseline runs: its mean loss on the batch, mixed with the clean loss by ``clean_weight``
    (for baselines that take it), then its ``update`` (if any)."""
    clean = settings.get("clean_weight", 0.0)

    def step(xb: Tensor, yb: Tensor, index: int) -> StepOutput:
        loss = baseline.loss(model, attacks, xb, yb, settings).mean()
        if clean > 0:
            loss = (1 - clean) * loss + clean * F.cross_entropy(model(xb), yb)
        return StepOutput(loss) if baseline.update is None else baseline.update(model, loss, xb, yb, settings)

    return step


def fit_baseline(
    baseline: Baseline,
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: Sequence[str | Attack],
    loop: LoopConfig,
    settings: Mapping[str, Any],
    *,
    progress: bool,
    checkpointing: Checkpointing,
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``baseline`` over ``loop`` (optimizer, lr, weight decay, data order from
    ``loop.seed``, which also seeds the attacks' random starts); the result's history has ``loss``,
    ``grad_norm``, ``skipped`` and ``bad_steps`` per step, plus what the baseline logs. ``tensorboard``: a
    TensorBoard log directory for those values and the learning rate (``engine/tensorboard.py``)."""
    resolved = resolve_attacks(baseline, attacks)
    values = check_settings(baseline, settings)
    logger = TensorBoardLogger(tensorboard) if tensorboard is not None else None
    device = resolve_device(loop.device)
    torch.manual_seed(loop.seed)
    model.to(device)
    x, y = training_tensors(model, train_data, device, images=bool(resolved))
    optimizer = make_optimizer(model.parameters(), loop.optimizer, loop.lr, loop.weight_decay)
    step = adversarial_step(baseline, model, resolved, values)
    trainable = Trainable(model, optimizer, list(model.parameters()))
    identity = _identity(baseline, resolved, values, loop, model)
    with deterministic_algorithms(loop.deterministic):
        return fit(trainable, x, y, step, loop, checkpointing=checkpointing, config=identity, progress=progress,
                   desc=baseline.name, logger=logger)  # fmt: skip


# Recorded for every baseline (at these defaults where it has no such setting), as the first checkpoints
# did, so that they still resume.
_FIRST_RECORDED = {"clean_weight": 0.0, "beta": 6.0}


def _identity(baseline: Baseline, attacks: list[Attack], settings: Mapping[str, float], loop: LoopConfig,
              model: nn.Module) -> dict[str, Any]:  # fmt: skip
    """What a resumed run must share with the one that wrote its checkpoint."""
    run = {"method": baseline.name, "attacks": [a.spec for a in attacks]}
    run |= {name: settings.get(name, default) for name, default in _FIRST_RECORDED.items()}
    run |= {"optimizer": loop.optimizer, "lr": loop.lr, "model": type(model).__name__}
    run |= {name: value for name, value in settings.items() if name not in _FIRST_RECORDED}
    return run | ({"weight_decay": loop.weight_decay} if loop.weight_decay else {})
