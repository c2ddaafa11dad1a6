"""Adversarial attacks on images in [0, 1]: a registry of native attacks, specs, torchattacks.

    import metaadv.attacks as A
    attack = A.make("pgd_linf(eps=0.3, steps=10)")   # or "cw_l2", "torchattacks:PGD(eps=0.3)"
    x_adv = attack(model, x, y)                       # model: nn.Module or any callable images -> logits
    A.make("art:AutoProjectedGradientDescent(norm=1, eps=10.0, eps_step=1.0)")  # ART, an L1 AutoPGD
    x_adv = attack(model, x, y, eps=eps_per_example)  # per-example (B,) eps for one call
    A.available()                                     # registered names; A.register adds your own

Native attacks: none, noise, fgsm, fgsm_rs, pgd_linf, pgd_l2, pgd_l1, mifgsm, l0 (one steepest-ascent
loop, ``steepest.py``), cw_l2 and deepfool (``minimum_norm.py``), and threat models outside the Lp
balls: spatial, spatial_grid and color (one loop over transform parameters, ``transforms.py``), the
unforeseen families of UAR built on that loop: elastic and stadv (``flow.py``), jpeg_linf (``jpeg.py``)
and gabor (``gabor.py``), and a learned perturbation generator (``generator.py``).
"""

from . import (  # noqa: F401  (importing a module registers its attacks)
    art_adapter,
    foolbox_adapter,
    minimum_norm,
    simple,
    steepest,
    torchattacks_adapter,
    transforms,
)
from .flow import elastic, stadv
from .gabor import gabor
from .generator import GeneratorAttack, generator
from .jpeg import jpeg_linf
from .minimum_norm import cw_l2, deepfool
from .msd import msd
from .norms import L0, L1, L2, Linf, LpNorm, project_l1
from .registry import available, register
from .simple import noise, none
from .spec import Attack, ModelFn, make, parse
from .steepest import fgsm, fgsm_rs, l0, mifgsm, pgd_l1, pgd_l2, pgd_linf, steepest_ascent
from .transforms import box_ascent, color, spatial, spatial_grid

__all__ = [
    "L0",
    "L1",
    "L2",
    "Attack",
    "GeneratorAttack",
    "Linf",
    "LpNorm",
    "ModelFn",
    "available",
    "box_ascent",
    "color",
    "cw_l2",
    "deepfool",
    "elastic",
    "fgsm",
    "fgsm_rs",
    "gabor",
    "generator",
    "jpeg_linf",
    "l0",
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
    "spatial",
    "spatial_grid",
    "stadv",
    "steepest_ascent",
]
