"""Run Foolbox 3 attacks against any model callable: ``"foolbox:NAME(..., eps=...)"``.

Foolbox (Rauber et al., https://github.com/bethgelab/foolbox) is the third independent evaluator, and
the one with the strongest L1 attack we measured: its minimum-norm FMN (Pintor et al. 2021),
``"foolbox:L1FMNAttack(steps=100, eps=10.0)"``. It is optional (``pip install foolbox``, which needs no
torch of its own).

Foolbox takes the radius at call time; here it is the spec's ``eps`` (``None``: unbounded, for
minimum-norm attacks). The returned images are Foolbox's *clipped* ones: a minimum-norm perturbation
larger than ``eps`` is projected onto the eps ball, so accuracy at eps is measured correctly. The
threat model follows the class name (``L1...``/``SparseL1...``: l1, ``L2...``: l2, ``Linf...``: linf).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .external import AsModule, import_optional, signature_params
from .registry import STANDARD_CHECKS, AttackEntry, Param, register_namespace

__all__ = ["INSTALL_HINT", "foolbox_entry"]

INSTALL_HINT = "pip install foolbox"
_NEED = f"Foolbox 3: {INSTALL_HINT}"


def _norm_of(class_name: str) -> str | None:
    name = class_name.lower().removeprefix("sparse")
    return next((n for n in ("linf", "l1", "l2") if name.startswith(n)), None)


def _run(cls: type, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float | None,
         **kwargs: Any) -> Tensor:  # fmt: skip
    fb = import_optional("foolbox", "foolbox", _NEED)
    fmodel = fb.PyTorchModel(AsModule(model_fn, x).eval(), bounds=(0.0, 1.0), device=x.device)
    with torch.enable_grad():
        _, clipped, _ = cls(**kwargs)(fmodel, x.detach(), y, epsilons=eps)
    return clipped.detach().to(dtype=x.dtype)


@functools.cache
def foolbox_entry(class_name: str) -> AttackEntry:
    """The registry entry for ``foolbox:<class_name>``; ValueError if Foolbox has no such attack."""
    attacks = import_optional("foolbox", "foolbox", _NEED).attacks
    cls = getattr(attacks, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, attacks.base.Attack)) or inspect.isabstract(cls):
        names = sorted(n for n in dir(attacks) if isinstance(getattr(attacks, n), type) and n[0].isupper())
        raise ValueError(f"unknown Foolbox attack {class_name!r}; available: {', '.join(names)}")
    name = f"foolbox:{class_name}"
    eps = Param("eps", None, (int, float), None, True, False, STANDARD_CHECKS.get("eps"))

    def check_all(values: Mapping[str, Any]) -> None:  # build once to surface bad values
        try:
            cls(**{k: v for k, v in values.items() if k != "eps"})
        except Exception as e:
            raise ValueError(f"{name}: Foolbox rejected {dict(values)}: {type(e).__name__}: {e}") from None

    summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
    params = (*signature_params(cls, skip=1), eps)
    norm = _norm_of(class_name)
    return AttackEntry(name, functools.partial(_run, cls), params, lambda _p: norm, summary, check_all)


register_namespace("foolbox", foolbox_entry)
