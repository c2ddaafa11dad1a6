"""MAX (method ``"max"``): multi-attack training on, per example, the worst attack's loss (Tramer & Boneh 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..attacks import Attack
from .adversarial import Baseline, attack_losses


def max_attack_loss(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor,
                    settings: Mapping[str, float]) -> Tensor:  # fmt: skip
    """Per-example cross-entropy (B,) of the attack that raises it most."""
    return attack_losses(model, attacks, x, y).max(0).values


BASELINE = Baseline("max", "per example the worst of several attacks (Tramer & Boneh 2019)", (1, None),
                    max_attack_loss)  # fmt: skip
