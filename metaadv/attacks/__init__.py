"""Adversarial attacks on images in [0, 1]: a registry of native attacks, specs, torchattacks.

    import metaadv.attacks as A
    attack = A.make("pgd_linf(eps=0.3, steps=10)")   # or "cw_l2", "torchattacks:PGD(eps=0.3)"
    x_adv = attack(model, x, y)                       # model: nn.Module or any callable images -> logits
    x_adv = attack(model, x, y, eps=eps_per_example)  # per-example (B,) eps for one call
    A.available()                                     # registered names; A.register adds your own

Native attacks: none, noise, fgsm, fgsm_rs, pgd_linf, pgd_l2, pgd_l1, mifgsm (one steepest-ascent
loop, ``steepest.py``), cw_l2 and deepfool (``minimum_norm.py``).
"""

from . import minimum_norm, simple, steepest, torchattacks_adapter  # noqa: F401  (register the attacks)
from .minimum_norm import cw_l2, deepfool
from .msd import msd
from .norms import L1, L2, Linf, LpNorm, project_l1
from .registry import available, register
from .simple import noise, none
from .spec import Attack, ModelFn, make, parse
from .steepest import fgsm, fgsm_rs, mifgsm, pgd_l1, pgd_l2, pgd_linf, steepest_ascent

__all__ = [
    "L1",
    "L2",
    "Attack",
    "Linf",
    "LpNorm",
    "ModelFn",
    "available",
    "cw_l2",
    "deepfool",
    "fgsm",
    "fgsm_rs",
    "make",
    "mifgsm",
    "msd",
    "noise",
    "none",
    "parse",
    "pgd_l1",
    "pgd_l2",
    "pgd_linf",
    "project_l1",
    "register",
    "steepest_ascent",
]
