"""ERM: standard training on clean data (the baseline every robust method is measured against)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import Attack
from .adversarial import Baseline


def erm_loss(
    model: nn.Module, attacks: Sequence[Attack], x: Tensor, y: Tensor, settings: Mapping[str, float]
) -> Tensor:
    """Per-example cross-entropy (B,) on the clean batch."""
    return F.cross_entropy(model(x), y, reduction="none")


BASELINE = Baseline("erm", "standard training on clean data", (0, 0), erm_loss, settings={})
