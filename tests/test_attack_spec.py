"""Attack specs and the registry: parsing, canonical round trips, validation messages, fuzzing."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pickle
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaadv.attacks as A
from metaadv.attacks import registry, torchattacks_adapter

NATIVE_SPECS = [
    "none",
    "noise(eps=0.3)",
    "noise(eps=2.0, dist='gaussian', norm='l2')",
    "fgsm(eps=0.3)",
    "fgsm_rs(eps=0.3)",
    "fgsm_rs(eps=0.3, alpha=0.2)",
    "pgd_linf(eps=0.3, steps=10, alpha=0.01, restarts=1)",
    "pgd_l2(eps=2.0, steps=20, random_start=False)",
    "pgd_l1(eps=10, sparsity=0.95)",
    "mifgsm(eps=0.3, decay=0.5)",
    "cw_l2",
    "cw_l2(eps=1.5, c=1, kappa=0.5, steps=10, lr=0.01)",
    "deepfool",
    "deepfool(eps=2.0, steps=5, overshoot=0.0)",
]
TORCHATTACKS_SPECS = [
    "torchattacks:PGD(eps=0.3, alpha=0.01, steps=40)",
    "torchattacks:AutoAttack(eps=0.3, norm='Linf', n_classes=10)",
    "torchattacks:Square(eps=0.3)",
    "torchattacks:CW",
    "torchattacks:PGDL2(eps=2.0)",
]


# --- parsing and round trips -------------------------------------------------------------------


@pytest.mark.parametrize("spec", NATIVE_SPECS + TORCHATTACKS_SPECS)
def test_canonical_spec_parses_back_to_an_equal_attack(spec):
    attack = A.make(spec)
    again = A.make(attack.spec)
    assert again == attack and hash(again) == hash(attack)
    assert A.make(attack) is attack
    assert A.make({"name": attack.name, **attack.params}) == attack
    assert pickle.loads(pickle.dumps(attack)) == attack
    assert copy.deepcopy(attack) == attack


def test_params_hold_resolved_defaults_and_are_read_only():
    attack = A.make("pgd_linf(eps=0.3)")
    assert attack.name == "pgd_linf"
    assert dict(attack.params) == {
        "eps": 0.3,
        "steps": 10,
        "alpha": None,
        "restarts": 1,
        "random_start": True,
    }
    assert attack.spec == "pgd_linf(eps=0.3, steps=10, alpha=None, restarts=1, random_start=True)"
    with pytest.raises(TypeError):
        attack.params["eps"] = 0.1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.name = "fgsm"  # type: ignore[misc]


def test_spec_syntax_variants():
    assert A.make("fgsm(eps=8/255)").eps == pytest.approx(8 / 255)
    assert A.make("  pgd_l2( eps = 2 , steps = 5 )  ").params["eps"] == 2.0  # int accepted for a float
    assert isinstance(A.make("pgd_l2(eps=2)").params["eps"], float)
    assert A.make("pgd_linf(eps=0.1*3)").eps == pytest.approx(0.3)
    assert A.make("none").spec == "none" and A.make("none()") == A.make("none")
    assert A.make({"name": "pgd_linf", "eps": 0.3}) == A.make("pgd_linf(eps=0.3)")
    assert A.make("torchattacks:PGD(eps=0.3)") == A.make({"name": "torchattacks:PGD", "eps": 0.3})
    assert A.parse("torchattacks : PGD(eps=0.3)") == ("torchattacks:PGD", {"eps": 0.3})
    assert A.parse("noise(eps=0.1, norm='l2')") == ("noise", {"eps": 0.1, "norm": "l2"})


@pytest.mark.parametrize(
    ("spec", "norm", "eps"),
    [
        ("none", None, None),
        ("noise(eps=0.3)", "linf", 0.3),
        ("noise(eps=2, norm='l2')", "l2", 2.0),
        ("fgsm(eps=0.3)", "linf", 0.3),
        ("pgd_l2(eps=2)", "l2", 2.0),
        ("pgd_l1(eps=10)", "l1", 10.0),
        ("mifgsm(eps=0.3)", "linf", 0.3),
        ("cw_l2", "l2", None),
        ("cw_l2(eps=1.5)", "l2", 1.5),
        ("deepfool(eps=2)", "l2", 2.0),
        ("torchattacks:PGD(eps=0.3)", "linf", 0.3),
        ("torchattacks:FGSM(eps=0.3)", "linf", 0.3),
        ("torchattacks:PGDL2(eps=2.0)", "l2", 2.0),
        ("torchattacks:APGD(eps=2.0, norm='L2')", "l2", 2.0),
        ("torchattacks:APGD(eps=0.3)", "linf", 0.3),
        ("torchattacks:AutoAttack(eps=0.3, norm='Linf', n_classes=10)", "linf", 0.3),
        ("torchattacks:Square(eps=0.3)", "linf", 0.3),
        ("torchattacks:CW", "l2", None),
        ("torchattacks:EADL1", "l1", None),
        ("torchattacks:GN", None, None),
    ],
)
def test_threat_model_norm_and_eps(spec, norm, eps):
    attack = A.make(spec)
    assert attack.norm == norm
    assert attack.eps == (pytest.approx(eps) if eps is not None else None)


def test_replace_returns_a_validated_copy():
    attack = A.make("pgd_linf(eps=0.3, steps=7)")
    smaller = attack.replace(eps=0.1)
    assert smaller.eps == 0.1 and smaller.params["steps"] == 7 and attack.eps == 0.3
    with pytest.raises(ValueError, match=r"pgd_linf\.eps must be > 0, got -0\.1"):
        attack.replace(eps=-0.1)
    with pytest.raises(ValueError, match="unknown hyper-parameter 'epsilon'"):
        attack.replace(epsilon=0.1)
    with pytest.raises(TypeError, match="at call time"):
        attack.replace(eps=torch.full((4,), 0.1))


def test_available_lists_the_native_attacks():
    names = A.available()
    assert names == sorted(names)
    expected = {
        "none",
        "noise",
        "fgsm",
        "fgsm_rs",
        "pgd_linf",
        "pgd_l2",
        "pgd_l1",
        "mifgsm",
        "cw_l2",
        "deepfool",
    }
    assert expected <= set(names)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "fragments"),
    [
        ("pgd", ValueError, ["unknown attack 'pgd'", "pgd_linf", "available", "torchattacks:NAME"]),
        ("pgd_linf", ValueError, ["missing required hyper-parameter 'eps'", "pgd_linf(eps=0.3)"]),
        ("fgsm()", ValueError, ["missing required", "'eps'"]),
        ("pgd_linf(eps=0.3", ValueError, ["malformed attack spec", "'pgd_linf(eps=0.3'"]),
        ("pgd_linf(0.3)", ValueError, ["malformed", "positional"]),
        ("pgd_linf(eps=0.3, eps=0.2)", ValueError, ["malformed", "given twice"]),
        (
            "pgd_linf(eps=0.3, epsilon=1)",
            ValueError,
            ["unknown hyper-parameter 'epsilon'", "allowed: eps, steps"],
        ),
        ("pgd_linf(eps=-0.3)", ValueError, ["pgd_linf.eps", "> 0", "-0.3"]),
        ("pgd_linf(eps=0)", ValueError, ["pgd_linf.eps", "> 0"]),
        ("pgd_linf(eps=1e999)", ValueError, ["finite"]),
        ("pgd_linf(eps=0.3, steps=0)", ValueError, ["pgd_linf.steps", "> 0", "got 0"]),
        ("pgd_linf(eps=0.3, restarts=0)", ValueError, ["pgd_linf.restarts", "> 0"]),
        ("pgd_linf(eps=0.3, alpha=-1)", ValueError, ["pgd_linf.alpha", "> 0"]),
        ("pgd_l1(eps=10, sparsity=1.0)", ValueError, ["pgd_l1.sparsity", "[0, 1)"]),
        ("noise(eps=0.3, dist='laplace')", ValueError, ["noise.dist", "'uniform', 'gaussian'"]),
        ("pgd_linf(eps='0.3')", TypeError, ["pgd_linf.eps", "'0.3'", "float"]),
        ("pgd_linf(eps=True)", TypeError, ["pgd_linf.eps", "bool"]),
        ("pgd_linf(eps=0.3, steps=2.5)", TypeError, ["pgd_linf.steps", "int"]),
        ("pgd_linf(eps=__import__('os'))", ValueError, ["malformed", "literals"]),
        ("pgd_linf(eps=1/0)", ValueError, ["division by zero"]),
        ("pgd_linf(**kw)", ValueError, ["malformed"]),
        ("a.b(eps=1)", ValueError, ["malformed"]),
        ("foo:pgd(eps=1)", ValueError, ["unknown attack namespace 'foo'", "torchattacks"]),
        ("torchattacks:NoSuch", ValueError, ["unknown torchattacks attack 'NoSuch'", "PGD"]),
        ("torchattacks:MultiAttack", ValueError, ["unknown torchattacks attack"]),
        ("torchattacks:PGD(eps=-1)", ValueError, ["torchattacks:PGD.eps", "> 0"]),
        ("torchattacks:PGD(model=1)", ValueError, ["unknown hyper-parameter 'model'"]),
        ("torchattacks:AutoAttack(version='bogus')", ValueError, ["torchattacks rejected", "version"]),
        ("x" * 2000, ValueError, ["longer than"]),
    ],
)
def test_bad_specs_raise_clear_errors(spec, error, fragments):
    with pytest.raises(error) as info:
        A.make(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (None, TypeError),
        (3, TypeError),
        ({"eps": 0.3}, ValueError),
        ({"name": 3}, TypeError),
        ({1: 2}, TypeError),
    ],
)
def test_bad_spec_objects(spec, error):
    with pytest.raises(error):
        A.make(spec)


def test_missing_torchattacks_names_the_install_command(monkeypatch):
    torchattacks_adapter.torchattacks_entry.cache_clear()
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
            A.make("torchattacks:PGD(eps=0.3)")
    finally:
        torchattacks_adapter.torchattacks_entry.cache_clear()


# --- user-registered attacks ---------------------------------------------------------------------


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_register_a_user_attack(scratch_registry):
    @A.register("sign_noise", norm="linf")
    def sign_noise(model_fn, x, y, *, eps: float, scale: float = 1.0):
        """Random-sign perturbation of size eps."""
        return (x + eps * scale * torch.randn_like(x).sign()).clamp(0, 1)

    assert "sign_noise" in A.available()
    attack = A.make("sign_noise(eps=0.1)")
    assert attack.norm == "linf" and attack.params["scale"] == 1.0
    assert A.make(attack.spec) == attack
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    assert (attack(lambda v: v.flatten(1)[:, :3], x, y) - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match=r"sign_noise\.eps must be > 0"):  # standard checks apply by name
        A.make("sign_noise(eps=0)")
    with pytest.raises(ValueError, match="already registered"):
        A.register("sign_noise", norm="linf")(sign_noise)


def test_register_rejects_bad_definitions(scratch_registry):
    with pytest.raises(ValueError, match="identifier"):
        A.register("torchattacks:x", norm=None)
    with pytest.raises(ValueError, match="norm must be"):
        A.register("ok_name", norm="l3")
    with pytest.raises(TypeError, match="signature"):
        A.register("two_args", norm=None)(lambda model_fn, x: x)


# --- fuzzing: nothing but ValueError / TypeError escapes make -------------------------------------

_names = st.sampled_from([*A.available(), "torchattacks:PGD", "torchattacks:Square", "torchattacks:X", "zz"])
_keys = st.sampled_from(["eps", "steps", "alpha", "restarts", "random_start", "norm", "dist", "c", "sparsity", "q"])
_values = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["True", "None", "'l2'", "'gaussian'", "8/255", "1/0", "-0.0", "[1, 2]", "x", "()", "1e999"]),
    st.text(max_size=6),
)
_pairs = st.lists(st.tuples(_keys, _values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


@st.composite
def grammarish_specs(draw):
    """Specs built from the grammar, then possibly damaged: a dropped or inserted character."""
    text = f"{draw(_names)}({', '.join(draw(_pairs))})"
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(["", "(", ")", ",", "=", ":", "'", "**", " ", "\x00", "\n"]))
        text = text[:i] + junk + text[i + 1 :]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_random_text_raises_only_value_or_type_errors(text):
    with contextlib.suppress(ValueError, TypeError):
        A.make(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grammarish_specs())
def test_grammarish_specs_raise_only_value_or_type_errors(spec):
    try:
        attack = A.make(spec)
    except (ValueError, TypeError):
        return
    assert A.make(attack.spec) == attack  # whatever parses round-trips


@settings(max_examples=100, deadline=None)
@given(
    eps=st.floats(1e-4, 16.0),
    steps=st.integers(1, 1000),
    alpha=st.one_of(st.none(), st.floats(1e-6, 5.0)),
    restarts=st.integers(1, 5),
    name=st.sampled_from(["pgd_linf", "pgd_l2", "pgd_l1"]),
)
def test_valid_specs_round_trip(eps, steps, alpha, restarts, name):
    attack = A.make({"name": name, "eps": eps, "steps": steps, "alpha": alpha, "restarts": restarts})
    assert A.make(attack.spec) == attack
    assert attack.params["eps"] == eps  # repr of floats is exact
