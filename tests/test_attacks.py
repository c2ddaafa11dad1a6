"""Attacks: every result inside its eps ball and [0, 1], no side effects on the model, and the expected
strength against a standard-trained (ERM) SmallCNN, cross-checked with torchattacks."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metaadv.attacks as A
from metaadv.models import SmallCNN

EPS = {"linf": (0.05, 0.3), "l2": (0.5, 2.0), "l1": (2.0, 10.0)}
PER_EXAMPLE = {"linf": (0.02, 0.3), "l2": (0.2, 2.0), "l1": (1.0, 10.0)}  # ranges for (B,) tensor eps

# (spec template, norm): small step counts keep these tests fast; strength is tested on the ERM model
BOUNDED = [
    ("noise(eps={})", "linf"),
    ("noise(eps={}, dist='gaussian')", "linf"),
    ("noise(eps={}, norm='l2', dist='gaussian')", "l2"),
    ("noise(eps={}, norm='l1')", "l1"),
    ("fgsm(eps={})", "linf"),
    ("generator(eps={}, steps=2)", "linf"),
    ("fgsm_rs(eps={})", "linf"),
    ("pgd_linf(eps={}, steps=3)", "linf"),
    ("pgd_linf(eps={}, steps=2, restarts=3)", "linf"),
    ("pgd_l2(eps={}, steps=3)", "l2"),
    ("pgd_l2(eps={}, steps=2, restarts=2)", "l2"),
    ("pgd_l1(eps={}, steps=3)", "l1"),
    ("pgd_l1(eps={}, steps=3, sparsity=0.9, restarts=2)", "l1"),
    ("mifgsm(eps={}, steps=3)", "linf"),
    ("cw_l2(eps={}, steps=5)", "l2"),
    ("deepfool(eps={}, steps=3)", "l2"),
]
ART_APGD_L1 = "AutoProjectedGradientDescent(norm=1, eps=5.0, eps_step=1.0, max_iter=2, nb_random_init=1)"
ALL_NATIVE = ["none", *(t.format(EPS[n][1]) for t, n in BOUNDED), "cw_l2(steps=5)", "deepfool(steps=3)"]
EXTERNAL = ["torchattacks:PGD(eps=0.3, steps=2)", "torchattacks:CW(steps=2)", f"art:{ART_APGD_L1}"]
EXTERNAL += ["foolbox:L1FMNAttack(steps=2, eps=5.0)"]
ALL_NATIVE += ["spatial(steps=2)", "spatial_grid(n=2)", "color(eps=0.3, steps=2)", "l0(k=5, steps=2)"]


def lp_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.double().flatten(1)
    return {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]


def assert_in_ball(x_adv, x, norm, eps):
    eps = torch.as_tensor(eps, dtype=torch.float64)
    assert bool((lp_norm(x_adv - x, norm) <= eps * (1 + 1e-6) + 1e-6).all()), (lp_norm(x_adv - x, norm), eps)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialized SmallCNN (with BatchNorm) and 8 MNIST-like images with exact 0s and 1s."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=32).eval()
    x = torch.rand(8, 1, 28, 28)
    x = torch.where(x < 0.4, torch.zeros_like(x), torch.where(x > 0.8, torch.ones_like(x), x))
    return model, x, torch.arange(8) % 10


# --- threat-model guarantees ---------------------------------------------------------------------


@pytest.mark.parametrize("eps_kind", ["small", "large", "per_example"])
@pytest.mark.parametrize(("template", "norm"), BOUNDED, ids=[t for t, _ in BOUNDED])
def test_result_inside_eps_ball_and_image_range(tiny, template, norm, eps_kind):
    model, x, y = tiny
    torch.manual_seed(1)
    if eps_kind == "per_example":
        eps = torch.linspace(*PER_EXAMPLE[norm], len(x))
        x_adv = A.make(template.format(1.0))(model, x, y, eps=eps)
    else:
        eps = EPS[norm][eps_kind == "large"]
        attack = A.make(template.format(eps))
        assert attack.norm == norm and attack.eps == eps
        x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert_in_ball(x_adv, x, norm, eps)


def test_per_example_eps_sets_each_radius(tiny):
    model, x, y = tiny
    eps = torch.linspace(0.02, 0.3, len(x))
    x_adv = A.make("pgd_linf(eps=0.1, steps=5)")(model, x, y, eps=eps)
    assert torch.allclose(lp_norm(x_adv - x, "linf"), eps.double(), atol=1e-6)  # sign steps reach each radius


def test_l1_projection_is_exact():
    torch.manual_seed(0)
    v = torch.randn(6, 1, 5, 5) * torch.tensor([0.01, 0.1, 1, 3, 10, 100]).view(-1, 1, 1, 1)
    eps = torch.full((6, 1, 1, 1), 2.0)
    p = A.project_l1(v, eps)
    n = lp_norm(v, "l1")
    assert torch.allclose(lp_norm(p, "l1"), torch.minimum(n, torch.tensor(2.0, dtype=torch.float64)), atol=1e-5)
    assert torch.equal(p[n <= 2], v[n <= 2])
    # optimality (Duchi et al. 2008): p soft-thresholds v with one threshold for every moved coordinate
    for vi, pi in zip(v[n > 2], p[n > 2], strict=True):
        moved = pi != 0
        theta = (vi.abs() - pi.abs())[moved]
        assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-5)
        assert bool((vi.abs()[~moved] <= theta[0] + 1e-6).all())


@pytest.mark.parametrize(
    "spec",
    [
        "noise(eps=0.3)",
        "pgd_linf(eps=0.3, steps=2)",
        "pgd_l1(eps=5, steps=2)",
        "cw_l2(steps=3)",
        "deepfool(steps=2)",
        "mifgsm(eps=0.1, steps=2)",
    ],
)
def test_float64_in_float64_out(tiny, spec):
    _, x, y = tiny
    model64 = SmallCNN(hidden=32).double().eval()
    x_adv = A.make(spec)(model64, x.double(), y)
    assert x_adv.dtype == torch.float64


# --- no side effects on the model --------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("spec", [*ALL_NATIVE, *EXTERNAL])
def test_model_mode_and_grads_untouched(tiny, spec, training):
    _, x, y = tiny
    torch.manual_seed(0)
    model = SmallCNN(hidden=32).train(training)
    A.make(spec)(model, x, y)
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_existing_grads_are_kept(tiny):
    _, x, y = tiny
    model = SmallCNN(hidden=32).eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    A.make("pgd_linf(eps=0.3, steps=2)")(model, x, y)
    A.make("torchattacks:CW(steps=2)")(model, x, y)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_attacks_work_inside_no_grad(tiny):
    model, x, y = tiny
    with torch.no_grad():
        x_adv = A.make("pgd_linf(eps=0.3, steps=2)")(model, x, y)
    assert (x_adv - x).abs().max() > 0.1


# --- any model callable -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [*ALL_NATIVE, *EXTERNAL])
def test_functional_closure_gives_the_same_result_as_the_module(tiny, spec):
    model, x, y = tiny
    params = dict(model.named_parameters())
    closure = lambda v: functional_call(model, params, (v,))  # noqa: E731
    torch.manual_seed(3)
    from_module = A.make(spec)(model, x, y)
    torch.manual_seed(3)
    from_closure = A.make(spec)(closure, x, y)
    assert torch.allclose(from_module, from_closure, atol=1e-6)
    assert all(p.grad is None for p in params.values())  # torchattacks's CW calls backward(): guarded


def test_attack_against_adapted_parameters_keeps_the_meta_gradient(tiny):
    model, x, y = tiny
    params = dict(model.named_parameters())
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads, strict=True)}  # one inner SGD step
    x_adv = A.make("pgd_linf(eps=0.3, steps=2)")(lambda v: functional_call(model, fast, (v,)), x, y)
    assert not x_adv.requires_grad
    F.cross_entropy(functional_call(model, fast, (x_adv,)), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny):
    model, x, y = tiny
    attack = A.make("pgd_linf(eps=0.3, steps=1)")
    cases = [
        (lambda: attack(model, x * 2, y), ValueError, "[0, 1]"),
        (lambda: attack(model, x - 0.5, y), ValueError, "[0, 1]"),
        (lambda: attack(model, x.masked_fill(x > 0.5, float("nan")), y), ValueError, "NaN"),
        (lambda: attack(model, (x * 255).long(), y), TypeError, "floating-point"),
        (lambda: attack(model, x[0], y), ValueError, "(B, C, H, W)"),
        (lambda: attack(model, x, y + 10), ValueError, "model has 10 classes"),
        (lambda: attack(model, x, -y - 1), ValueError, "negative label"),
        (lambda: attack(model, x, y.float()), TypeError, "integer"),
        (lambda: attack(model, x, y[:3]), ValueError, "shape (8,)"),
        (lambda: attack(lambda v: model(v)[:, :1].squeeze(1), x, y), ValueError, "logits of shape"),
        (lambda: attack("model", x, y), TypeError, "callable"),
        (lambda: attack(model, x, y, eps=torch.full((3,), 0.1)), ValueError, "shape () or (8,)"),
        (lambda: attack(model, x, y, eps=torch.full((8,), -0.1)), ValueError, "pgd_linf.eps must be > 0"),
        (lambda: attack(model, x, y, eps=torch.full((8,), float("nan"))), ValueError, "finite"),
        (lambda: attack(model, x, y, steps=torch.tensor(3)), TypeError, "pgd_linf.steps"),
        (lambda: attack(model, x, y, epsilon=0.1), ValueError, "unknown hyper-parameter 'epsilon'"),
    ]
    for call, error, fragment in cases:
        with pytest.raises(error) as info:
            call()
        assert fragment in str(info.value), (fragment, str(info.value))


# --- strength on a standard-trained model ---------------------------------------------------------


@pytest.fixture(scope="module")
def erm_accuracy(erm_model, mnist_batch):
    """accuracy(spec, n) of the ERM model on the first n test digits under that attack (memoized, seeded)."""
    x, y = mnist_batch

    @functools.cache
    def accuracy(spec: str, n: int = 100) -> float:
        torch.manual_seed(0)
        x_adv = A.make(spec)(erm_model, x[:n], y[:n])
        with torch.no_grad():
            return (erm_model(x_adv).argmax(1) == y[:n]).float().mean().item()

    return accuracy


def test_erm_model_is_standard_trained(erm_accuracy):
    assert erm_accuracy("none") > 0.9


def test_pgd_far_below_random_noise(erm_accuracy):
    assert erm_accuracy("noise(eps=0.3)") > 0.8
    assert erm_accuracy("pgd_linf(eps=0.3)") < 0.1


def test_native_pgd_agrees_with_torchattacks(erm_accuracy):
    native = erm_accuracy("pgd_linf(eps=0.1, alpha=0.025, steps=10)")
    reference = erm_accuracy("torchattacks:PGD(eps=0.1, alpha=0.025, steps=10)")
    assert 0.2 < reference < 0.9  # an eps where the comparison means something
    assert abs(native - reference) <= 0.05


def test_fgsm_weaker_than_pgd(erm_accuracy):
    assert erm_accuracy("fgsm(eps=0.1)") > erm_accuracy("pgd_linf(eps=0.1, alpha=0.025, steps=10)") + 0.05


def test_l2_and_l1_attacks_hurt_a_lot(erm_accuracy):
    clean = erm_accuracy("none")
    assert erm_accuracy("pgd_l2(eps=2.0)") < 0.4
    assert erm_accuracy("pgd_l1(eps=10)") < clean - 0.35


def test_accuracy_falls_as_eps_grows(erm_accuracy):
    accs = [erm_accuracy(f"pgd_linf(eps={e})") for e in (0.05, 0.1, 0.2, 0.3)]
    assert all(b <= a + 0.02 for a, b in itertools.pairwise(accs)), accs
    assert accs[0] > accs[-1] + 0.5


def test_restarts_do_not_weaken_pgd(erm_accuracy):
    assert erm_accuracy("pgd_linf(eps=0.1, steps=5, restarts=3)") <= erm_accuracy("pgd_linf(eps=0.1, steps=5)") + 0.02


@pytest.mark.parametrize("spec", ["cw_l2", "deepfool"])
def test_unbounded_minimum_norm_attacks_fool_nearly_every_correct_point(erm_model, mnist_batch, spec):
    x, y = (t[:48] for t in mnist_batch)
    torch.manual_seed(0)
    x_adv = A.make(spec)(erm_model, x, y)
    with torch.no_grad():
        correct = erm_model(x).argmax(1) == y
        fooled = erm_model(x_adv).argmax(1) != y
    assert (fooled & correct).sum() >= 0.95 * correct.sum()
    assert lp_norm(x_adv - x, "l2")[fooled].median() < 3.0  # minimal perturbations are small on MNIST


def test_bounded_deepfool_stays_in_ball_and_is_weaker(erm_model, mnist_batch):
    x, y = (t[:48] for t in mnist_batch)
    x_adv = A.make("deepfool(eps=1.0)")(erm_model, x, y)
    assert_in_ball(x_adv, x, "l2", 1.0)
    with torch.no_grad():
        assert 0.2 < (erm_model(x_adv).argmax(1) == y).float().mean() < 0.95


def test_torchattacks_autoattack_and_square_run_on_a_closure(erm_model, mnist_batch):
    x, y = (t[:16] for t in mnist_batch)
    params = {k: v.detach() for k, v in erm_model.named_parameters()}
    closure = lambda v: functional_call(erm_model, params, (v,))  # noqa: E731

    def accuracy(spec: str) -> float:
        x_adv = A.make(spec)(closure, x, y)
        assert_in_ball(x_adv, x, "linf", 0.3)
        with torch.no_grad():
            return (erm_model(x_adv).argmax(1) == y).float().mean().item()

    assert accuracy("torchattacks:AutoAttack(eps=0.3, norm='Linf', n_classes=10)") < 0.1
    assert accuracy("torchattacks:Square(eps=0.3, n_queries=30)") < 0.9  # black box, 30 queries: some damage
