"""Unforeseen threat models (Kang et al.'s UAR; Xiao et al.'s StAdv): elastic, stadv, jpeg_linf, gabor.

Each attack's bound lives in its own parameter space: flow components in pixels (elastic, stadv), block DCT
coefficients (jpeg_linf), a pixel Linf ball filled with Gabor noise (gabor). These tests pin the transforms,
record what each attack actually applies to check the bound at every step, and check that each attack is
stronger than a random draw from the same set.
"""

import importlib

import pytest
import torch

import metaadv as ma
import metaadv.attacks as A

flow = importlib.import_module("metaadv.attacks.flow")
jpeg = importlib.import_module("metaadv.attacks.jpeg")
gabor = importlib.import_module("metaadv.attacks.gabor")  # the package attribute `gabor` is the attack


def digits(n: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return ma.models.SmallCNN(hidden=16).eval()


# --- the transforms ------------------------------------------------------------------------------


def test_a_flow_of_whole_pixels_shifts_the_image_and_repeats_the_border():
    x = digits(2)
    shift = torch.zeros(2, 2, 28, 28)
    shift[0, 0] = 2.0  # each output pixel reads 2 columns to its right: the content moves left
    shift[1, 1] = -3.0  # reads 3 rows above: the content moves down
    out = flow.apply_flow(x, shift)
    assert torch.allclose(out[0, :, :, :-2], x[0, :, :, 2:], atol=1e-5)
    assert torch.allclose(out[0, :, :, -2:], x[0, :, :, -1:].expand(-1, -1, 2), atol=1e-5)  # border padding
    assert torch.allclose(out[1, :, 3:], x[1, :, :-3], atol=1e-5)
    assert torch.allclose(flow.apply_flow(x, torch.zeros(2, 2, 28, 28)), x, atol=1e-5)


def test_the_gaussian_blur_keeps_a_field_in_its_box_and_a_constant_field_unchanged():
    field = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    blurred = flow.gaussian_blur(field, 2.0)
    assert blurred.shape == field.shape and blurred.abs().max() <= 1
    assert blurred.abs().max() < 0.5 * field.abs().max()  # it does smooth
    assert torch.allclose(flow.gaussian_blur(torch.full((1, 2, 9, 9), -0.7), 3.0), torch.full((1, 2, 9, 9), -0.7))
    assert flow.gaussian_blur(field, 0.0) is field


def test_flow_smoothness_counts_each_neighbour_pair_once():
    constant = torch.full((1, 2, 5, 5), 0.3)
    assert flow.flow_smoothness(constant).item() == pytest.approx(40 * 1e-4)  # 40 pairs, sqrt(1e-8) each
    step = torch.zeros(1, 2, 5, 5)
    step[:, :, :, 3:] = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # one jump of length 5 in each of 5 rows
    assert flow.flow_smoothness(step).item() == pytest.approx(5 * 5.0, abs=1e-2)


def test_the_block_dct_is_orthonormal_and_invertible():
    d = jpeg.dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)
    x = digits(2)[:, :, :24, :16]
    coef = jpeg.block_dct(x)
    assert coef.shape == (2, 1, 3, 2, 8, 8)
    assert torch.allclose(jpeg.block_idct(coef), x, atol=1e-5)
    flat = jpeg.block_dct(torch.full((1, 1, 8, 8), 0.5))  # a constant block is all DC: 8 * value
    assert flat[0, 0, 0, 0, 0, 0].item() == pytest.approx(4.0) and flat.flatten()[1:].abs().max() < 1e-6


def test_jpeg_transform_pads_28x28_to_32x32_and_crops_back():
    x = digits(2)
    assert torch.allclose(jpeg.jpeg_transform(x, torch.zeros(2, 32 * 32)), x, atol=1e-5)
    dc = torch.zeros(2, 1, 4, 4, 8, 8)
    dc[:, :, 0, 0, 0, 0] = 0.8  # the DC coefficient of the top-left block: +0.1 on its 64 pixels
    out = jpeg.jpeg_transform(x * 0.5, dc.flatten(1))
    assert torch.allclose(out[:, :, :8, :8], x[:, :, :8, :8] * 0.5 + 0.1, atol=1e-5)
    assert torch.allclose(out[:, :, 8:], x[:, :, 8:] * 0.5, atol=1e-5)


def test_gabor_noise_is_normalized_to_exactly_eps():
    x = torch.full((2, 1, 28, 28), 0.5)
    phi = torch.rand(2, 784, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = (torch.rand(2, 784, generator=torch.Generator().manual_seed(3)) < 0.2).float()
    kernel = gabor.gabor_kernel(13, 3.0, 8.0, 4)
    eps = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    delta = gabor.gabor_transform(x, phi, mask, kernel, eps) - x
    assert torch.allclose(delta.flatten(1).abs().amax(dim=1), torch.tensor([0.1, 0.3]))
    assert torch.allclose(kernel, kernel.flip(0).flip(1))  # orientations spread over 180 degrees: symmetric


# --- every attack stays inside its bound and [0, 1], at every step ----------------------------------


def spy_on(monkeypatch, module, name, measure):
    """Replace ``module.name`` with a wrapper that records ``measure(args, out)`` at every call."""
    seen, real = [], getattr(module, name)

    def spy(*args):
        out = real(*args)
        seen.append(measure(args, out))
        return out

    monkeypatch.setattr(module, name, spy)
    return seen


BOUNDED = [  # spec, (module, function the attack applies), measure(args, out) -> (B,), bound
    ("elastic(eps=0.7, sigma=1.5, steps=4)", (flow, "apply_flow"), lambda a, o: a[1].flatten(1).abs().amax(1), 0.7),
    ("stadv(eps=0.7, tau=0.01, steps=4)", (flow, "apply_flow"), lambda a, o: a[1].flatten(1).abs().amax(1), 0.7),
    ("jpeg_linf(eps=0.2, steps=4)", (jpeg, "jpeg_transform"), lambda a, o: a[1].abs().amax(1), 0.2),
    ("gabor(eps=0.2, steps=4)", (gabor, "gabor_transform"), lambda a, o: (o - a[0]).flatten(1).abs().amax(1), 0.2),
]


@pytest.mark.parametrize(("spec", "target", "measure", "bound"), BOUNDED, ids=[b[0].split("(")[0] for b in BOUNDED])
def test_what_the_attack_applies_is_inside_its_bound_at_every_step(
    monkeypatch, tiny_model, spec, target, measure, bound
):
    seen = spy_on(monkeypatch, *target, measure)
    x = digits()
    out = A.make(spec)(tiny_model, x, torch.arange(4))
    assert len(seen) == 5  # 4 steps + the returned image
    assert all(torch.all(m <= bound + 1e-6) for m in seen)
    assert seen[-1].max() > 0.5 * bound  # and it uses the budget
    assert out.min() >= 0 and out.max() <= 1 and out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize(("spec", "target", "measure", "bound"), BOUNDED, ids=[b[0].split("(")[0] for b in BOUNDED])
def test_eps_may_be_given_per_example(monkeypatch, tiny_model, spec, target, measure, bound):
    seen = spy_on(monkeypatch, *target, measure)
    eps = torch.tensor([0.25, 0.5, 1.0, 1.0]) * bound
    A.make(spec)(tiny_model, digits(), torch.arange(4), eps=eps)
    assert all(torch.all(m <= eps + 1e-6) for m in seen)
    assert A.make(spec).batch_key == A.make(spec).replace(eps=bound / 2).batch_key  # one call for many eps


def test_the_gabor_result_is_in_the_linf_ball_of_the_image():
    x = digits(8)
    out = A.make("gabor(eps=0.1, steps=3)")(ma.models.SmallCNN(hidden=16).eval(), x, torch.arange(8))
    assert (out - x).abs().max() <= 0.1 + 1e-6


def test_a_larger_tau_gives_a_smoother_stadv_flow(monkeypatch, tiny_model):
    seen = spy_on(monkeypatch, flow, "apply_flow", lambda a, o: flow.flow_smoothness(a[1]))
    x, y = digits(), torch.arange(4)
    torch.manual_seed(0)
    A.make("stadv(eps=1, tau=0, steps=10)")(tiny_model, x, y)
    rough = seen[-1]
    torch.manual_seed(0)
    A.make("stadv(eps=1, tau=1, steps=10)")(tiny_model, x, y)
    assert torch.all(seen[-1] < 0.5 * rough)  # sign steps of 0.25 pixel: smooth only to within a step


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("elastic(sigma=-1)", "sigma"),
        ("stadv(tau=-0.1)", "tau"),
        ("jpeg_linf(eps=0)", "eps"),
        ("gabor(kernel_size=12)", "kernel_size"),
        ("gabor(density=0)", "density"),
        ("gabor(orientations=0)", "orientations"),
    ],
)
def test_bad_parameters_are_rejected_by_name(spec, error):
    with pytest.raises((ValueError, TypeError), match=error):
        A.make(spec)


# --- any model callable, no side effects ------------------------------------------------------------

SPECS = ["elastic(steps=2)", "stadv(steps=2)", "jpeg_linf(steps=2)", "gabor(steps=2)"]


@pytest.mark.parametrize("spec", SPECS)
def test_a_functional_copy_gives_the_same_result_as_the_module(tiny_model, spec):
    x, y = digits(), torch.arange(4)
    params, buffers = dict(tiny_model.named_parameters()), dict(tiny_model.named_buffers())
    torch.manual_seed(0)
    functional = A.make(spec)(ma.functional.model_fn(tiny_model, params, buffers), x, y)
    torch.manual_seed(0)
    assert torch.allclose(functional, A.make(spec)(tiny_model, x, y), atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
def test_the_model_keeps_its_mode_weights_and_grads(spec, training):
    torch.manual_seed(0)
    model = ma.models.SmallCNN(hidden=16).train(training)
    before = {k: v.clone() for k, v in model.named_parameters()}
    A.make(spec)(model, digits(), torch.arange(4))
    assert all(m.training == training for m in model.modules())
    assert all(torch.equal(p, before[k]) and p.grad is None for k, p in model.named_parameters())


@pytest.mark.parametrize("spec", SPECS)
def test_float64_images_give_float64_results(spec):
    torch.manual_seed(0)
    model = ma.models.SmallCNN(hidden=16).double().eval()
    x = digits(dtype=torch.float64)
    out = A.make(spec)(model, x, torch.arange(4))
    assert out.dtype == torch.float64 and out.shape == x.shape


# --- strength on a trained model --------------------------------------------------------------------


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def uniform(*shape: int) -> torch.Tensor:
    return 2 * torch.rand(*shape) - 1


def random_draw(attack: A.Attack, x: torch.Tensor) -> torch.Tensor:
    """The attack's transform at parameters drawn uniformly from its box (what its random start draws)."""
    p, b = attack.params, len(x)
    if attack.name == "elastic":
        return flow.elastic_transform(x, p["eps"] * uniform(b, 2 * 28 * 28), p["sigma"])
    if attack.name == "stadv":
        return flow.apply_flow(x, p["eps"] * uniform(b, 2, 28, 28))
    if attack.name == "jpeg_linf":
        return jpeg.jpeg_transform(x, p["eps"] * uniform(b, 32 * 32))
    mask = (torch.rand(b, 28 * 28) < p["density"]).float()
    kernel = gabor.gabor_kernel(p["kernel_size"], p["sigma"], p["wavelength"], p["orientations"])
    return gabor.gabor_transform(x, uniform(b, 28 * 28), mask, kernel, torch.tensor(p["eps"]))


@pytest.mark.parametrize(
    ("spec", "margin"),
    [("elastic(steps=10)", 0.5), ("stadv(steps=10)", 0.5), ("jpeg_linf(steps=10)", 0.3), ("gabor(steps=10)", 0.15)],
)
def test_each_attack_beats_a_random_draw_from_its_own_threat_model(erm_model, mnist_batch, spec, margin):
    x, y = mnist_batch[0][:100], mnist_batch[1][:100]
    attack = A.make(spec)
    torch.manual_seed(0)
    random = accuracy(erm_model, random_draw(attack, x), y)
    torch.manual_seed(0)
    worst = accuracy(erm_model, attack(erm_model, x, y), y)
    assert worst < random - margin
    assert all(p.grad is None for p in erm_model.parameters()) and not erm_model.training
