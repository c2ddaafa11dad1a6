"""AVG: multi-attack training on the loss averaged over the attacks, of any norms (Tramer & Boneh 2019)."""

from __future__ import annotations

from .adversarial import Baseline
from .pgd_at import mean_attack_loss

BASELINE = Baseline("avg", "the loss averaged over several attacks (Tramer & Boneh 2019)", (1, None),
                    mean_attack_loss)  # fmt: skip
