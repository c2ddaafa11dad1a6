"""MSD: multi steepest descent (Maini et al. 2020): training on one attack against the union of the Linf, L2
and L1 balls, which at each step keeps per example the norm whose step raises the loss most."""

from __future__ import annotations

from ..attacks import Attack
from .adversarial import Baseline
from .pgd_at import mean_attack_loss


def msd_attack(attacks: list[Attack]) -> list[Attack]:
    """The one ``msd`` attack of ``attacks``: an ``msd(...)`` spec as given, or the union of Lp attacks: for
    each norm among them the largest eps, with the largest ``steps`` among them (1 for attacks without
    ``steps``, such as fgsm) and msd's default step sizes (pass an ``msd(...)`` spec to set those)."""
    if len(attacks) == 1 and attacks[0].name == "msd":
        return attacks
    bad = [a.spec for a in attacks if a.norm is None or a.eps is None]
    if bad:
        raise ValueError(
            f"method 'msd' takes one msd(...) attack, or Lp attacks with an eps (pgd_linf, pgd_l2, pgd_l1, fgsm, ...) "
            f"whose union it attacks; got {bad}"
        )
    eps = {f"eps_{n}": max((a.eps for a in attacks if a.norm == n), default=None) for n in ("linf", "l2", "l1")}
    steps = max(int(a.params.get("steps", 1)) for a in attacks)
    return [Attack("msd", {**eps, "steps": steps})]


BASELINE = Baseline("msd", "one attack on the union of the Linf, L2 and L1 balls (Maini et al. 2020)", (1, None),
                    mean_attack_loss, check=msd_attack)  # fmt: skip
