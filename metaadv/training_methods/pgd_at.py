"""PGD-AT: adversarial training on one attack (Madry et al. 2018); ``clean_weight=0.5`` gives the 50/50
clean + adversarial variant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..attacks import Attack
from .adversarial import Baseline, attack_losses


def mean_attack_loss(model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor,
                     settings: Mapping[str, float]) -> Tensor:  # fmt: skip
    """Per-example cross-entropy (B,) on the adversarial batches, averaged over the attacks."""
    return attack_losses(model, attacks, x, y).mean(0)


BASELINE = Baseline("pgd_at", "adversarial training on one attack (Madry et al. 2018)", (1, 1), mean_attack_loss)
