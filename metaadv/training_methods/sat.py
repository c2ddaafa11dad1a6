"""SAT: stochastic adversarial training (Croce & Hein 2022): each batch is trained on one of the attacks,
drawn uniformly; with an Linf and an L1 attack it is their E-AT (the extreme norms, which also cover L2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..attacks import Attack
from .adversarial import Baseline
from .pgd_at import mean_attack_loss


def sat_loss(
    model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor, settings: Mapping[str, float]
) -> Tensor:
    """Per-example cross-entropy (B,) under one attack drawn uniformly from the global RNG (checkpointed, so a
    resumed run draws the same ones)."""
    drawn = attacks[int(torch.randint(len(attacks), ()))]
    return mean_attack_loss(model, [drawn], x, y, settings)


BASELINE = Baseline("sat", "one of several attacks per batch, drawn uniformly (Croce & Hein 2022)", (2, None),
                    sat_loss)  # fmt: skip
