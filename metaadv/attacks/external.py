"""Wrapping model callables for external attack libraries (torchattacks, ART).

External attacks expect an ``nn.Module`` whose parameters they may touch (``eval()``, ``backward()``).
:class:`AsModule` gives them one around any callable images -> logits, functional copies included,
without exposing the user's module or its parameters; :func:`signature_params` turns an attack class's
constructor into spec parameters.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .registry import STANDARD_CHECKS, Param

__all__ = ["AsModule", "import_optional", "signature_params"]


def import_optional(module: str, namespace: str, need: str) -> Any:
    """Import an optional attack library, or raise ImportError saying what ``namespace:`` attacks need."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"'{namespace}:' attacks need {need}") from e


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


class AsModule(nn.Module):
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


def signature_params(cls: type, defaults: Mapping[str, Any] | None = None, skip: int = 2) -> tuple[Param, ...]:
    """Hyper-parameters of an external attack class from its ``__init__``, after its first ``skip``
    parameters (``self, model``; foolbox's constructors take no model: ``skip=1``).

    Only parameters with literal defaults become spec parameters; ``defaults`` replaces some of them
    (the canonical spec shows the value used). A float ``inf`` default becomes the string ``"inf"``.
    """
    out = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[skip:]:
        d = (defaults or {}).get(p.name, p.default)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or d is p.empty:
            continue
        if isinstance(d, float) and d == float("inf"):  # a norm: 1, 2 or "inf" (no literal for infinity)
            d, kinds = "inf", (int, float, str)
        elif isinstance(d, bool):
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
