"""Per-example correctness of a model: on clean inputs and under an attack run white-box against it, its
adversarial examples checked (images in [0, 1], inside the attack's ball); attack specs resolved in order."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import attacks as _attacks
from ..types import ModelFn
from ..validation import check_images

__all__ = ["attack_correct", "correct", "craft", "frac", "logits_of", "percent", "resolve_attacks", "right"]


def resolve_attacks(attacks: Any) -> dict[str, Callable[..., Tensor]]:
    """spec -> attack, in the order given. Accepts one attack or a sequence of specs/dicts/Attacks."""
    if isinstance(attacks, (str, Mapping)) or _is_attack(attacks):
        attacks = [attacks]
    if not isinstance(attacks, Sequence):
        raise TypeError(f"attacks must be an attack spec or a sequence of them, got {type(attacks).__name__}")
    if len(attacks) == 0:
        raise ValueError("attacks is empty: give at least one attack spec, e.g. ['pgd_linf(eps=0.3)']")
    out: dict[str, Callable[..., Tensor]] = {}
    for a in attacks:
        atk = a if _is_attack(a) else _attacks.make(a)
        if atk.spec in out:
            raise ValueError(f"attack {atk.spec!r} is listed twice")
        out[atk.spec] = atk
    return out


def _is_attack(a: object) -> bool:
    """An ``Attack`` or anything shaped like one: callable ``(model_fn, x, y) -> x_adv`` with a ``.spec``."""
    return not isinstance(a, (str, Mapping)) and callable(a) and isinstance(getattr(a, "spec", None), str)


def frac(mask: Tensor) -> float:
    return int(mask.sum()) / mask.numel()


def percent(mask: Tensor) -> float:
    return 100 * frac(mask)


def _batches(x: Tensor, y: Tensor, batch_size: int) -> zip:
    return zip(x.split(batch_size), y.split(batch_size), strict=True)


def logits_of(fn: ModelFn, x: Tensor, batch_size: int) -> Tensor:
    """``fn``'s logits (N, classes) on ``x`` (N, C, H, W), in batches, without gradient."""
    with torch.no_grad():
        return torch.cat([fn(xb) for xb in x.split(batch_size)])


def right(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example correctness (N,) bool of ``logits`` (N, classes); non-finite logits are misclassified."""
    return (logits.argmax(1) == y) & logits.isfinite().all(1)


def correct(fn: ModelFn, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Per-example correctness (N,) bool; an example whose logits are not all finite is misclassified."""
    return right(logits_of(fn, x, batch_size), y)


def craft(atk: Callable[..., Tensor], spec: str, fn: ModelFn, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Adversarial examples of ``x`` against ``fn``, checked: images in [0, 1] inside the attack's ball."""
    out = []
    for xb, yb in _batches(x, y, batch_size):
        with torch.enable_grad():
            xa = atk(fn, xb, yb)
        if not isinstance(xa, Tensor) or xa.shape != xb.shape:
            raise ValueError(f"attack {spec!r} must return a tensor of shape {tuple(xb.shape)}")
        xa = check_images(xa.detach(), f"adversarial examples of {spec!r}")
        _check_ball(atk, spec, xa - xb)
        out.append(xa)
    return torch.cat(out)


def attack_correct(
    atk: Callable[..., Tensor], spec: str, fn: ModelFn, x: Tensor, y: Tensor, batch_size: int, seed: int
) -> Tensor:
    """Per-example correctness under ``atk`` run white-box against ``fn`` (reseeded: order-independent)."""
    torch.manual_seed(seed)
    return correct(fn, craft(atk, spec, fn, x, y, batch_size), y, batch_size)


_ORD = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}


def _check_ball(atk: object, spec: str, delta: Tensor) -> None:
    norm, eps = getattr(atk, "norm", None), getattr(atk, "eps", None)
    if norm not in _ORD or not isinstance(eps, (int, float)):
        return
    size = float(delta.flatten(1).norm(p=_ORD[norm], dim=1).max())
    if size > eps * (1 + 1e-4) + 1e-5:
        warnings.warn(
            f"attack {spec!r} left its {norm} ball: perturbation {size:.6g} > eps {eps}; its numbers are not "
            "a valid robustness measurement",
            RuntimeWarning,
            stacklevel=4,
        )
