"""Run any torchattacks attack against any model callable: specs ``"torchattacks:PGD(eps=0.3, steps=40)"``.

torchattacks (Kim 2020, https://github.com/Harry24k/adversarial-attacks-pytorch) is the independent
evaluator of metaadv: an implementation nobody here wrote, AutoAttack included. It is optional.
Install it with ``pip install --no-deps torchattacks==3.5.1``: its metadata pins ``requests~=2.25.1``
and lets pip replace a CPU torch with a multi-GB CUDA build, while its attacks only import torch,
scipy and tqdm (``pip install scipy tqdm``).

The model callable (an ``nn.Module`` or a ``functional_call`` closure) is wrapped in a small
``nn.Module`` with a parameter-free device anchor, so torchattacks finds the device; the user's module
is not a submodule of that wrapper, so torchattacks's ``eval()``/``train()`` calls do not reach it:
the attack runs the model in the mode it is in, like the native attacks.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .registry import STANDARD_CHECKS, AttackEntry, Param, register_namespace

__all__ = ["INSTALL_HINT", "torchattacks_entry"]

INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1"
_LINF = frozenset(
    {"FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "DIFGSM", "TIFGSM", "Jitter"}
    | {"NIFGSM", "PGDRS", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA", "PIFGSM", "PIFGSMPP"}
)
_L2 = frozenset({"PGDL2", "PGDRSL2", "CW", "DeepFool", "EADEN"})  # CW, DeepFool, EADEN: minimum-norm, eps None
_L1 = frozenset({"EADL1"})
_NORM_ARG = {"Linf": "linf", "L2": "l2", "L1": "l1"}  # APGD, APGDT, FAB, AutoAttack, Square: norm= argument
_UNSUPPORTED = frozenset({"MultiAttack", "LGV"})  # wrappers that need other attacks or a data loader


def _torchattacks() -> Any:
    try:
        return importlib.import_module("torchattacks")
    except ImportError as e:
        raise ImportError(
            f"'torchattacks:' attacks need torchattacks: {INSTALL_HINT} (--no-deps: its requests pin and its "
            "torch requirement would replace your torch; it needs only torch, scipy and tqdm)"
        ) from e


class _InputGradOnly(torch.autograd.Function):
    """logits = fn(x) whose backward reaches x only: some torchattacks attacks call ``loss.backward()``,
    which would otherwise accumulate ``.grad`` into the parameters a closure captures."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            ctx.x = x.detach().requires_grad_(True)
            ctx.out = fn(ctx.x)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (grad_x,) = torch.autograd.grad(ctx.out, ctx.x, grad_out)
        return grad_x, None


class _AsModule(nn.Module):
    """An ``nn.Module`` view of a callable images -> logits, on the device and dtype of ``like``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], like: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)  # not registered: torchattacks's eval()/train() must not reach it
        anchor = torch.empty(0, device=like.device, dtype=like.dtype)
        self.anchor = nn.Parameter(anchor, requires_grad=False)  # torchattacks reads the device from it

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _InputGradOnly.apply(x, self.fn)
        with torch.no_grad():  # no gradient w.r.t. x wanted: build no graph to the parameters either
            return self.fn(x)


def _norm_of(class_name: str) -> Callable[[Mapping[str, Any]], str | None]:
    if class_name in _LINF:
        return lambda _p: "linf"
    if class_name in _L2:
        return lambda _p: "l2"
    if class_name in _L1:
        return lambda _p: "l1"
    return lambda p: _NORM_ARG.get(p.get("norm"))  # type: ignore[arg-type]


def _params(cls: type) -> tuple[Param, ...]:
    """Hyper-parameters from the class's ``__init__(self, model, ...)``; only literal defaults."""
    out = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[2:]:
        d = p.default
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or d is p.empty:
            continue
        if isinstance(d, bool):
            kinds: tuple[type, ...] = (bool,)
        elif isinstance(d, int | float):
            kinds = (int, float)  # torchattacks often writes c=1 for a float: accept both, keep as given
        elif isinstance(d, str | tuple):
            kinds = (type(d),)
        elif d is None:
            kinds = ()
        else:
            continue  # not expressible in a spec
        name = "eps" if p.name == "max_epsilon" else p.name
        out.append(Param(p.name, d, kinds, None, d is None, False, STANDARD_CHECKS.get(name)))
    return tuple(out)


def _run(cls: type, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    attack = cls(_AsModule(model_fn, x), **kwargs)
    return attack(x, y).detach().to(dtype=x.dtype)


@functools.cache
def torchattacks_entry(class_name: str) -> AttackEntry:
    """The registry entry for ``torchattacks:<class_name>``; ValueError if there is no such attack class."""
    ta = _torchattacks()
    cls = getattr(ta, class_name, None)
    names = sorted(n for n in ta.__all__ if n not in _UNSUPPORTED)
    if class_name not in names or not (isinstance(cls, type) and issubclass(cls, ta.attack.Attack)):
        raise ValueError(f"unknown torchattacks attack {class_name!r}; available: {', '.join(names)}")
    name = f"torchattacks:{class_name}"

    def check_all(params: Mapping[str, Any]) -> None:  # build once on a dummy model to surface bad values
        try:
            cls(_AsModule(lambda v: v, torch.empty(0)), **params)
        except Exception as e:
            raise ValueError(f"{name}: torchattacks rejected {dict(params)}: {type(e).__name__}: {e}") from None

    summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
    return AttackEntry(name, functools.partial(_run, cls), _params(cls), _norm_of(class_name), summary, check_all)


register_namespace("torchattacks", torchattacks_entry)
