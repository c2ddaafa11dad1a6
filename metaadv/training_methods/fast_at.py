"""Fast adversarial training (Wong et al. 2020): PGD-AT on one ``fgsm_rs`` attack (FGSM from a random start)."""

from __future__ import annotations

from ..attacks import Attack
from .adversarial import Baseline
from .pgd_at import mean_attack_loss


def check_fgsm_rs(attacks: list[Attack]) -> list[Attack]:
    """The one attack must be ``fgsm_rs``."""
    if attacks[0].name != "fgsm_rs":
        raise ValueError(
            f"method 'fast_at' is pgd_at with an fgsm_rs attack, e.g. 'fgsm_rs(eps=0.3)'; got {attacks[0]}"
        )
    return attacks


BASELINE = Baseline("fast_at", "pgd_at on one fgsm_rs attack (Wong et al. 2020)", (1, 1), mean_attack_loss,
                    check=check_fgsm_rs)  # fmt: skip
