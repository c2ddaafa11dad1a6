"""Attack registry: names -> attack functions, with typed and validated hyper-parameters.

An attack is a function ``fn(model_fn, x, y, *, hyper-parameters) -> x_adv``. Registering it with
:func:`register` reads its keyword-only parameters (annotations, defaults) so that specs such as
``"pgd_linf(eps=0.3)"`` are checked before anything runs. Common names get standard checks
(``eps > 0``, ``steps >= 1``, ...); pass ``checks=`` for others.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import keyword
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from torch import Tensor

from ..validation import check_positive

__all__ = ["REQUIRED", "AttackEntry", "Param", "available", "lookup", "register", "register_namespace"]

REQUIRED: Any = inspect.Parameter.empty  # marks a hyper-parameter without default
_LITERALS = (bool, int, float, str, tuple)  # what a spec can hold (besides None)
NORMS = ("linf", "l2", "l1")
Check = Callable[[str, Any], None]  # check(label, value) raises ValueError; label like "pgd_linf.eps"


def positive(label: str, value: Any) -> None:
    check_positive(value, label)


def non_negative(label: str, value: Any) -> None:
    check_positive(value, label, allow_zero=True)


def positive_int(label: str, value: Any) -> None:
    check_positive(value, label, integer=True)


# Applied by parameter name to every registered attack (and to torchattacks keyword arguments).
STANDARD_CHECKS: dict[str, Check] = {
    "eps": positive,
    "alpha": positive,
    "steps": positive_int,
    "restarts": positive_int,
    "n_restarts": positive_int,
    "lr": positive,
    "c": positive,
    "kappa": non_negative,
    "decay": non_negative,
    "overshoot": non_negative,
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default and what values it accepts.

    ``kinds`` are the accepted Python types of spec values (empty: any literal); an ``int`` is
    accepted where only ``float`` is and converted. ``per_example`` marks parameters that may be a
    tensor of shape (B,) (or a 0-d tensor) when passed at call time.
    """

    name: str
    default: Any = REQUIRED
    kinds: tuple[type, ...] = ()
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    per_example: bool = False
    check: Check | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, attack: str, value: Any, batch: int | None = None) -> Any:
        """Return ``value`` (an int converted to float where a float is expected) or raise."""
        label = f"{attack}.{self.name}"
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{label} must not be None; {self._allowed()}")
        if isinstance(value, Tensor):
            return self._validate_tensor(label, value, batch)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, int) and not isinstance(value, bool) and int not in self.kinds and float in self.kinds:
            value = float(value)
        kinds = self.kinds or _LITERALS
        if not any(isinstance(value, k) and (k is bool or not isinstance(value, bool)) for k in kinds):
            raise TypeError(f"{label} got {value!r} ({type(value).__name__}); {self._allowed()}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{label} must be finite, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{label} got {value!r}; allowed: {', '.join(map(repr, self.choices))}")
        if self.check is not None and isinstance(value, int | float) and not isinstance(value, bool):
            self.check(label, value)
        return value

    def _validate_tensor(self, label: str, value: Tensor, batch: int | None) -> Tensor:
        if not self.per_example:
            raise TypeError(f"{label} must be a plain value, not a tensor; {self._allowed()}")
        if batch is None:
            raise TypeError(
                f"{label}: pass a per-example tensor at call time, attack(model_fn, x, y, {self.name}=t); "
                "specs hold plain numbers"
            )
        if not value.is_floating_point() or value.shape not in ((), (batch,)):
            raise ValueError(
                f"{label} as a tensor must be floating point of shape () or ({batch},), "
                f"got dtype {value.dtype} shape {tuple(value.shape)}"
            )
        if self.check is not None:
            self.check(label, float(value.min()))  # also rejects NaN / inf via the min
            self.check(label, float(value.max()))
        return value

    def _allowed(self) -> str:
        names = [k.__name__ for k in self.kinds] or ["a literal"]
        if self.choices is not None:
            names = [", ".join(map(repr, self.choices))]
        if self.optional:
            names.append("None")
        if self.per_example:
            names.append("a (B,) tensor at call time")
        return "expected " + " or ".join(names)


@dataclasses.dataclass(frozen=True)
class AttackEntry:
    """A registered attack: its function, hyper-parameters and threat model (norm)."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...]
    norm_of: Callable[[Mapping[str, Any]], str | None]
    summary: str = ""
    check_all: Callable[[Mapping[str, Any]], None] | None = None  # cross-parameter check

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``given`` keyword arguments and fill in defaults (in signature order)."""
        by_name = {p.name: p for p in self.params}
        for key in given:
            if key not in by_name:
                allowed = ", ".join(by_name) or "none"
                raise ValueError(f"{self.name}: unknown hyper-parameter {key!r}; allowed: {allowed}")
        out = {}
        for p in self.params:
            if p.name in given:
                out[p.name] = p.validate(self.name, given[p.name])
            elif p.required:
                example = f"{self.name}({p.name}=0.3)" if p.name == "eps" else f"{self.name}({p.name}=...)"
                raise ValueError(f"{self.name}: missing required hyper-parameter {p.name!r} (e.g. {example!r})")
            else:
                out[p.name] = p.default
        if self.check_all is not None:
            self.check_all(out)
        return out

    def resolve_overrides(self, overrides: Mapping[str, Any], batch: int) -> dict[str, Any]:
        """Validate call-time overrides, which may hold per-example (B,) tensors."""
        by_name = {p.name: p for p in self.params}
        out = {}
        for key, value in overrides.items():
            if key not in by_name:
                raise ValueError(f"{self.name}: unknown hyper-parameter {key!r}; allowed: {', '.join(by_name)}")
            out[key] = by_name[key].validate(self.name, value, batch)
        return out


_REGISTRY: dict[str, AttackEntry] = {}
_NAMESPACES: dict[str, Callable[[str], AttackEntry]] = {}


def register(
    name: str,
    *,
    norm: str | Callable[[Mapping[str, Any]], str | None] | None,
    checks: Mapping[str, Check] | None = None,
    overwrite: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding ``fn(model_fn, x, y, *, hyper-parameters) -> x_adv`` to the registry as ``name``.

    Args:
        name: a Python identifier, used in specs (``"name(k=v)"``).
        norm: the threat model, ``"linf" | "l2" | "l1" | None``, or a function of the resolved
            hyper-parameters returning one (e.g. for an attack with a ``norm`` parameter).
        checks: extra value checks by parameter name, ``check(label, value)`` raising ValueError;
            they replace the standard ones (``eps > 0``, ``steps >= 1``, ...) for those names.
        overwrite: replace an existing registration instead of raising.

    Hyper-parameters are the function's keyword-only parameters; their annotations give accepted
    types (``float``, ``int``, ``bool``, ``str``, ``Literal[...]``, ``None``, and ``Tensor`` for
    per-example values), parameters without default are required. The function is returned unchanged.

    Example::

        @metaadv.attacks.register("sign_noise", norm="linf")
        def sign_noise(model_fn, x, y, *, eps: float):
            return (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"attack name must be a Python identifier, got {name!r}")
    if not callable(norm) and norm not in (*NORMS, None):
        raise ValueError(f"norm must be one of {NORMS}, None or a function of the parameters, got {norm!r}")

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"attack {name!r} is already registered; pass overwrite=True to replace it")
        params = params_from_signature(fn, checks or {})
        norm_of = norm if callable(norm) else (lambda _p, n=norm: n)
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = AttackEntry(name, fn, params, norm_of, summary)
        return fn

    return decorator


def params_from_signature(fn: Callable[..., Any], checks: Mapping[str, Check]) -> tuple[Param, ...]:
    """Read the keyword-only hyper-parameters of ``fn(model_fn, x, y, *, ...)``."""
    sig = inspect.signature(fn)
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 3 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TypeError(
            f"an attack's signature must be fn(model_fn, x, y, *, hyper-parameters), got {fn.__name__}{sig}"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    unknown = set(checks) - {p.name for p in sig.parameters.values()}
    if unknown:
        raise ValueError(f"checks given for unknown parameters {sorted(unknown)} of {fn.__name__}")
    out = []
    for p in sig.parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        kinds, choices, optional, per_example = _parse_annotation(hints.get(p.name, REQUIRED), p.default)
        check = checks.get(p.name, STANDARD_CHECKS.get(p.name))
        out.append(Param(p.name, p.default, kinds, choices, optional, per_example, check))
    return tuple(out)


def _parse_annotation(ann: Any, default: Any) -> tuple[tuple[type, ...], tuple | None, bool, bool]:
    """(kinds, choices, optional, per_example) from a type annotation, else from the default."""
    if ann is REQUIRED:
        if default is REQUIRED or default is None:
            return (), None, default is None, False
        return (type(default),), None, False, False
    kinds: list[type] = []
    choices: list[Any] | None = None
    optional = per_example = False
    stack = [ann]
    while stack:
        a = stack.pop()
        origin = typing.get_origin(a)
        if origin in (Union, types.UnionType):
            stack.extend(typing.get_args(a))
        elif origin is Literal:
            choices = [*(choices or []), *typing.get_args(a)]
            kinds.extend(type(c) for c in typing.get_args(a))
        elif a is type(None) or a is None:
            optional = True
        elif a is Tensor:
            per_example = True
        elif a in (bool, int, float, str, tuple):
            kinds.append(a)
        else:  # an annotation we cannot check: accept any literal
            return (), None, True, per_example
    return tuple(dict.fromkeys(kinds)), tuple(choices) if choices else None, optional, per_example


def register_namespace(prefix: str, resolver: Callable[[str], AttackEntry]) -> None:
    """Resolve specs ``"prefix:Name(...)"`` with ``resolver(Name)`` (used by the torchattacks adapter)."""
    _NAMESPACES[prefix] = resolver


def lookup(name: str, namespace: str | None = None) -> AttackEntry:
    """The entry for a native ``name``, or for ``namespace:name``; ValueError listing what exists."""
    if namespace is not None:
        if namespace not in _NAMESPACES:
            raise ValueError(f"unknown attack namespace {namespace!r}; available: {', '.join(_NAMESPACES)}")
        return _NAMESPACES[namespace](name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        extra = "".join(f", or {ns}:NAME(...)" for ns in _NAMESPACES)
        raise ValueError(f"unknown attack {name!r}{hint}; available: {', '.join(available())}{extra}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the registered attacks (native and user-registered), sorted."""
    return sorted(_REGISTRY)
