"""Attack specs: safe parsing of ``"pgd_linf(eps=0.3, steps=10)"`` (``ast``, literals only); the Attack class.

``make(spec)`` turns a string, a dict or an Attack into an immutable :class:`Attack`, whose ``spec``
is canonical: ``make(a.spec) == a``. Calling an Attack validates the images and labels and runs the
registered function against any model callable.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..types import ModelFn
from ..validation import check_images, check_labels, check_logits
from ..views import cat_rows, to_device
from .registry import AttackEntry, lookup

__all__ = ["Attack", "ModelFn", "group_by_batch_key", "make", "parse", "run_grouped"]


_MAX_SPEC_CHARS = 1000
_MAX_INT = 2**62
_NAMESPACED = re.compile(r"\s*([A-Za-z_]\w*)\s*:(.*)", re.DOTALL)


class FrozenParams(Mapping[str, Any]):
    """A read-only, hashable mapping of resolved hyper-parameters (in signature order)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


@dataclasses.dataclass(frozen=True, init=False)
class Attack:
    """An attack with fixed hyper-parameters: ``attack(model_fn, x, y) -> x_adv``.

    Build it with :func:`make`. ``name`` is the registered name (``"pgd_linf"``,
    ``"torchattacks:PGD"``), ``params`` the resolved hyper-parameters including defaults, ``spec``
    the canonical string, ``norm``/``eps`` the threat model (``None`` where unbounded or unknown).
    Attacks run the model in whatever mode it is in (put it in eval mode for evaluation); they leave
    its mode and its parameters' ``.grad`` as they found them.
    """

    name: str
    params: FrozenParams
    _entry: AttackEntry = dataclasses.field(compare=False, repr=False, hash=False)

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"attack name must be a string, got {type(name).__name__}")
        namespace, _, short = name.rpartition(":")
        entry = lookup(short, namespace or None)
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"attack params must be a mapping, got {type(params).__name__}")
        resolved = entry.resolve(params or {})
        object.__setattr__(self, "name", entry.name)
        object.__setattr__(self, "params", FrozenParams(resolved))
        object.__setattr__(self, "_entry", entry)

    @property
    def spec(self) -> str:
        """Canonical spec string, ``name(k=v, ...)``; ``make(self.spec) == self``."""
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    @property
    def norm(self) -> str | None:
        """``"linf" | "l2" | "l1"`` for the threat model of the attack, ``None`` if it has none."""
        return self._entry.norm_of(self.params)

    @property
    def eps(self) -> float | None:
        """The perturbation budget in the ``norm`` (pixel scale [0, 1]), ``None`` when unbounded."""
        eps = self.params.get("eps")
        if self.norm is None or isinstance(eps, bool) or not isinstance(eps, int | float):
            return None
        return float(eps)

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Attacks with equal keys run the same function with the same hyper-parameters except ``eps``, so
        they can run as one call with a per-example eps (:func:`run_grouped`). ``None`` where eps cannot be
        per example (no ``eps``, torchattacks, msd) or is not set (``cw_l2`` without a bound)."""
        eps = next((p for p in self._entry.params if p.name == "eps"), None)
        if eps is None or not eps.per_example or self.params["eps"] is None:
            return None
        return (self._entry.fn, self.name, tuple((k, v) for k, v in self.params.items() if k != "eps"))

    def replace(self, **changes: Any) -> Attack:
        """A validated copy with some hyper-parameters changed, e.g. ``attack.replace(eps=0.2)``."""
        return Attack(self.name, {**self.params, **changes})

    def __call__(self, model_fn: ModelFn, x: Tensor, y: Tensor, *, check: bool = True, **overrides: Any) -> Tensor:
        """Adversarial examples for images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

        ``model_fn`` is any callable images -> logits (B, K): an ``nn.Module`` or a closure over
        ``torch.func.functional_call``. ``overrides`` change hyper-parameters for this call only and
        may be per-example tensors of shape (B,) where the attack supports it (``eps``, ``alpha``).
        ``check=False`` skips the checks of the images' range, the labels and the logits, each of which
        reads a value back from the device (a host sync on a GPU): for inputs already checked, as the
        training loops' are. Returns ``x_adv`` detached, same shape, dtype and device as ``x``.
        """
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable (images -> logits), got {type(model_fn).__name__}")
        x, y = (check_images(x), check_labels(y, x.shape[0])) if check else (x, y.long())
        params = dict(self.params)
        if overrides:
            params.update(self._entry.resolve_overrides(overrides, x.shape[0]))
        target = _CheckedModel(model_fn, y) if check else model_fn
        with _preserve_module_state(model_fn), torch.enable_grad():
            x_adv = self._entry.fn(target, x.detach(), y, **params)
        return x_adv.detach().to(dtype=x.dtype)

    def __repr__(self) -> str:
        return f"Attack({self.spec!r})"

    def __str__(self) -> str:
        return self.spec

    def __reduce__(self) -> tuple[Any, ...]:  # pickle/deepcopy by spec
        return (make, (self.spec,))


class _CheckedModel:
    """Calls ``model_fn``; on the first call checks its logits and that labels are below their count."""

    def __init__(self, model_fn: ModelFn, y: Tensor) -> None:
        self.model_fn, self.y, self.checked = model_fn, y, False

    def __call__(self, x: Tensor) -> Tensor:
        logits = self.model_fn(x)
        if not self.checked:
            check_logits(logits, x.shape[0])
            check_labels(self.y, self.y.shape[0], logits.shape[1])
            self.checked = True
        return logits


@contextlib.contextmanager
def _preserve_module_state(model_fn: object) -> Iterator[None]:
    """Restore the train/eval flags and parameter ``.grad`` of an ``nn.Module`` after an attack."""
    if not isinstance(model_fn, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model_fn.modules()]
    grads = [(p, p.grad) for p in model_fn.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, g in grads:
            if p.grad is not g:
                p.grad = g


def group_by_batch_key(attacks: Sequence[Attack]) -> list[list[int]]:
    """Indices of ``attacks`` grouped by :attr:`Attack.batch_key` (in order of first appearance); an attack
    without a key is a group of its own."""
    groups: dict[Any, list[int]] = {}
    for i, attack in enumerate(attacks):
        key = attack.batch_key
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    return list(groups.values())


def run_grouped(
    attacks: Sequence[Attack], model_fn: ModelFn, xs: Sequence[Tensor], ys: Sequence[Tensor]
) -> list[Tensor]:
    """Adversarial examples of ``attacks[i]`` for ``xs[i]`` (B_i, C, H, W), ``ys[i]`` (B_i,) in ONE attack call.

    The attacks must share a ``batch_key`` (a single attack needs none): their function runs once on the
    concatenated images, with eps as a (B,) tensor built on the images' device where it has a key. Unlike
    ``attack(model_fn, x, y)`` this reads no values back from the device (no checks of the image range,
    the labels or eps, each of which synchronizes with a GPU): pass images and labels that are already
    checked, as ``meta_train`` does. Random starts are drawn for the whole batch at once, so the result
    equals separate calls only for deterministic attacks on a model whose outputs do not depend on the
    rest of the batch (eval mode). Returns one detached x_adv per attack, shaped like ``xs[i]``.
    """
    if not attacks or len(attacks) != len(xs) or len(xs) != len(ys):
        raise ValueError(
            f"need one image batch and one label batch per attack, got {len(attacks)}, {len(xs)}, {len(ys)}"
        )
    first = attacks[0]
    if len(attacks) > 1 and (first.batch_key is None or any(a.batch_key != first.batch_key for a in attacks)):
        raise ValueError(f"attacks differ in more than eps, cannot run as one call: {[a.spec for a in attacks]}")
    x, y = cat_rows(xs), cat_rows(ys)
    params = dict(first.params)
    if first.batch_key is not None:  # eps as a (B,) tensor, built on the host, sent without a host sync
        sizes = torch.tensor([len(xi) for xi in xs])
        eps = torch.tensor([a.params["eps"] for a in attacks], dtype=x.dtype).repeat_interleave(sizes)
        params["eps"] = to_device(eps, x.device)
    with _preserve_module_state(model_fn), torch.enable_grad():
        x_adv = first._entry.fn(model_fn, x.detach(), y.long(), **params).detach().to(dtype=x.dtype)
    return list(x_adv.split([len(xi) for xi in xs]))


def make(spec: str | Mapping[str, Any] | Attack) -> Attack:
    """Build an :class:`Attack` from a spec.

    Accepts ``"pgd_linf(eps=0.3, steps=10)"``, a bare name ``"cw_l2"``, numeric literals such as
    ``eps=8/255``, ``"torchattacks:PGD(eps=0.3, alpha=0.01, steps=40)"``, a dict
    ``{"name": "pgd_linf", "eps": 0.3}``, or an Attack (returned as is). Values must be literals
    (numbers, strings, True/False/None); nothing is evaluated. Raises ValueError for unknown names,
    malformed specs, unknown or missing hyper-parameters and out-of-range values, TypeError for
    values of the wrong type (and ImportError for ``torchattacks:`` specs without torchattacks).
    """
    if isinstance(spec, Attack):
        return spec
    if isinstance(spec, str):
        name, kwargs = parse(spec)
        return Attack(name, kwargs)
    if isinstance(spec, Mapping):
        if not all(isinstance(k, str) for k in spec):
            raise TypeError(f"attack spec dict keys must be strings, got {list(spec)!r}")
        if "name" not in spec:
            raise ValueError(f"attack spec dict needs a 'name' key, got keys {sorted(spec)}")
        name = spec["name"]
        if not isinstance(name, str):
            raise TypeError(f"attack spec 'name' must be a string, got {type(name).__name__}")
        parsed, kwargs = parse(name)
        if kwargs:
            raise ValueError(f"attack spec dict 'name' must be a bare name, got {name!r}")
        return Attack(parsed, {k: v for k, v in spec.items() if k != "name"})
    raise TypeError(f"attack spec must be a string, a dict or an Attack, got {type(spec).__name__}")


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"[namespace:]name(k=v, ...)"`` into ``(name, {k: v})`` without evaluating anything."""
    if not isinstance(spec, str):
        raise TypeError(f"attack spec must be a string, got {type(spec).__name__}")
    if len(spec) > _MAX_SPEC_CHARS:
        raise ValueError(f"attack spec is longer than {_MAX_SPEC_CHARS} characters: {_quote(spec)}")
    prefix, body = "", spec
    match = _NAMESPACED.fullmatch(spec)
    if match:
        prefix, body = match.group(1) + ":", match.group(2)
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: null bytes
        raise ValueError(f"malformed attack spec {_quote(spec)}: {type(e).__name__}: {e}") from None
    try:
        name, kwargs = _read_call(tree, spec)
    except (RecursionError, OverflowError) as e:  # OverflowError: e.g. a huge int divided to a float
        raise ValueError(f"malformed attack spec {_quote(spec)}: {type(e).__name__}: {e}") from None
    return prefix + name, kwargs


def _quote(spec: str) -> str:
    return repr(spec) if len(spec) <= 80 else repr(spec[:77]) + "..."


def _read_call(node: ast.expr, spec: str) -> tuple[str, dict[str, Any]]:
    usage = "expected 'name' or 'name(key=value, ...)' with literal values"
    if isinstance(node, ast.Name):
        return node.id, {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"malformed attack spec {_quote(spec)}: {usage}")
    if node.args:
        raise ValueError(f"malformed attack spec {_quote(spec)}: positional arguments are not allowed; {usage}")
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"malformed attack spec {_quote(spec)}: '**' is not allowed; {usage}")
        if kw.arg in kwargs:
            raise ValueError(f"malformed attack spec {_quote(spec)}: {kw.arg!r} is given twice")
        kwargs[kw.arg] = _literal(kw.value, spec)
    return node.func.id, kwargs


def _literal(node: ast.expr, spec: str, depth: int = 0) -> Any:
    """A literal value: number, string, bool, None, +-x, a*b, a/b of numbers, or a tuple/list of literals."""
    bad = ValueError(
        f"malformed attack spec {_quote(spec)}: values must be literals (numbers, strings, True/False/None, "
        "or a numeric a/b), got an expression"
    )
    if depth > 20:
        raise bad
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | str | float):
            return value
        if isinstance(value, int):
            return _in_range(value, spec)
        raise bad
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _number(node.operand, spec, depth, bad)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div | ast.Mult):
        a, b = _number(node.left, spec, depth, bad), _number(node.right, spec, depth, bad)
        if isinstance(node.op, ast.Mult):
            return _in_range(a * b, spec)
        if b == 0:
            raise ValueError(f"malformed attack spec {_quote(spec)}: division by zero")
        return _in_range(a / b, spec)
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_literal(e, spec, depth + 1) for e in node.elts)
    raise bad


def _number(node: ast.expr, spec: str, depth: int, bad: ValueError) -> int | float:
    value = _literal(node, spec, depth + 1)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad
    return value


def _in_range(value: int | float, spec: str) -> int | float:
    if isinstance(value, int) and abs(value) > _MAX_INT:
        raise ValueError(f"malformed attack spec {_quote(spec)}: an integer beyond 2**62 is out of range")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"malformed attack spec {_quote(spec)}: NaN is not a valid value")
    return value
