"""Run any torchattacks attack against any model callable: specs ``"torchattacks:PGD(eps=0.3, steps=40)"``.

torchattacks (Kim 2020, https://github.com/Harry24k/adversarial-attacks-pytorch) is the independent
evaluator of metaadv: an implementation nobody here wrote, AutoAttack included. It is optional.
Install it with ``pip install --no-deps torchattacks==3.5.1``: its metadata pins ``requests~=2.25.1``
and lets pip replace a CPU torch with a multi-GB CUDA build, while its attacks only import torch,
scipy and tqdm (``pip install scipy tqdm``).

The model callable (an ``nn.Module`` or a ``functional_call`` closure) is wrapped by
:class:`~metaadv.attacks.external.AsModule`, so torchattacks's ``eval()``/``train()`` calls do not
reach it: the attack runs the model in the mode it is in, like the native attacks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .external import AsModule, import_optional, signature_params
from .registry import AttackEntry, register_namespace

__all__ = ["INSTALL_HINT", "torchattacks_entry"]

INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1"
_NEED = (
    f"torchattacks: {INSTALL_HINT} (--no-deps: its requests pin and its torch requirement would replace your "
    "torch; it needs only torch, scipy and tqdm)"
)
_LINF = frozenset(
    {"FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "DIFGSM", "TIFGSM", "Jitter"}
    | {"NIFGSM", "PGDRS", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA", "PIFGSM", "PIFGSMPP"}
)
_L2 = frozenset({"PGDL2", "PGDRSL2", "CW", "DeepFool", "EADEN"})  # CW, DeepFool, EADEN: minimum-norm, eps None
_L1 = frozenset({"EADL1"})
_NORM_ARG = {"Linf": "linf", "L2": "l2", "L1": "l1"}  # APGD, APGDT, FAB, AutoAttack, Square: norm= argument
_UNSUPPORTED = frozenset({"MultiAttack", "LGV"})  # wrappers that need other attacks or a data loader


def _norm_of(class_name: str) -> Callable[[Mapping[str, Any]], str | None]:
    if class_name in _LINF:
        return lambda _p: "linf"
    if class_name in _L2:
        return lambda _p: "l2"
    if class_name in _L1:
        return lambda _p: "l1"
    return lambda p: _NORM_ARG.get(p.get("norm"))  # type: ignore[arg-type]


def _run(cls: type, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    attack = cls(AsModule(model_fn, x), **kwargs)
    return attack(x, y).detach().to(dtype=x.dtype)


@functools.cache
def torchattacks_entry(class_name: str) -> AttackEntry:
    """The registry entry for ``torchattacks:<class_name>``; ValueError if there is no such attack class."""
    ta = import_optional("torchattacks", "torchattacks", _NEED)
    cls = getattr(ta, class_name, None)
    names = sorted(n for n in ta.__all__ if n not in _UNSUPPORTED)
    if class_name not in names or not (isinstance(cls, type) and issubclass(cls, ta.attack.Attack)):
        raise ValueError(f"unknown torchattacks attack {class_name!r}; available: {', '.join(names)}")
    name = f"torchattacks:{class_name}"

    def check_all(params: Mapping[str, Any]) -> None:  # build once on a dummy model to surface bad values
        try:
            cls(AsModule(lambda v: v, torch.empty(0)), **params)
        except Exception as e:
            raise ValueError(f"{name}: torchattacks rejected {dict(params)}: {type(e).__name__}: {e}") from None

    summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
    params = signature_params(cls)
    return AttackEntry(name, functools.partial(_run, cls), params, _norm_of(class_name), summary, check_all)


register_namespace("torchattacks", torchattacks_entry)
