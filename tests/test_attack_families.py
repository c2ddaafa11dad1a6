"""Threat models outside the Lp balls: spatial (rotation + translation), color, sparse L0; and the learned
perturbation generator.

Each attack's bound lives in its own parameter space; these tests pin the geometry of the transforms,
check that the bound is enforced, and that each attack is stronger than a random draw from its set.
"""

import pytest
import torch

import metaadv as ma
import metaadv.attacks as A
from metaadv.attacks import transforms
from metaadv.attacks.norms import L0


def digits(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


# --- the transforms ------------------------------------------------------------------------------


def test_integer_translation_shifts_pixels_and_pads_with_black():
    x = digits()
    phi = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.0, -1.0, 1.0]])
    out = transforms.spatial_transform(x, phi)
    assert torch.allclose(out[0, :, :, 2:], x[0, :, :, :-2], atol=1e-5)  # right by 2 pixels
    assert out[0, :, :, :2].abs().max() < 1e-5
    assert torch.allclose(out[1, :, :-3], x[1, :, 3:], atol=1e-5)  # up by 3 pixels
    assert torch.allclose(out[2], x[2], atol=1e-5)
    assert torch.allclose(out[3, :, 1:, :-1], x[3, :, :-1, 1:], atol=1e-5)  # left 1, down 1


def test_a_rotation_by_90_degrees_is_rot90_and_by_0_is_the_identity():
    x = digits(2)
    turned = transforms.spatial_transform(x, torch.tensor([[90.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    quarter = [torch.rot90(x[0], k, dims=(1, 2)) for k in (1, -1)]
    assert min((turned[0] - q).abs().max() for q in quarter) < 1e-4
    assert torch.allclose(turned[1], x[1], atol=1e-5)


def test_color_transform_is_brightness_and_contrast_around_the_mean():
    x = digits(2) * 0.5 + 0.25
    out = transforms.color_transform(x, torch.tensor([[0.1, 0.0], [0.0, 0.2]]))
    assert torch.allclose(out[0], x[0] + 0.1, atol=1e-6)
    mean = x[1].mean()
    assert torch.allclose(out[1], ((x[1] - mean) * 1.2 + mean).clamp(0, 1), atol=1e-6)


# --- the bounds are enforced -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "bound"),
    [
        ("spatial(max_rot=10, max_trans=2, steps=5)", "spatial_transform", torch.tensor([10.0, 2.0, 2.0])),
        ("color(eps=0.2, steps=5)", "color_transform", torch.tensor([0.2, 0.2])),
    ],
)
def test_every_transform_the_attack_tries_or_returns_is_inside_its_box(monkeypatch, tiny_model, spec, name, bound):
    seen = []
    real = getattr(transforms, name)

    def spy(x, phi):
        seen.append(phi.detach().abs())
        return real(x, phi)

    monkeypatch.setattr(transforms, name, spy)
    x = digits()
    out = A.make(spec)(tiny_model, x, torch.arange(4))
    assert len(seen) == 6 and all(torch.all(p <= bound + 1e-6) for p in seen)  # 5 steps + the result
    assert out.min() >= 0 and out.max() <= 1


def test_l0_changes_at_most_k_pixels_counting_channels_once():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 10))
    out = A.make("l0(k=5, steps=5)")(model, x, torch.arange(3))
    changed = ((out - x).abs().sum(dim=1) > 0).flatten(1).sum(dim=1)
    assert torch.all(changed <= 5) and torch.all(changed >= 1)
    assert out.min() >= 0 and out.max() <= 1
    delta = torch.randn(3, 3, 8, 8)
    kept = L0().project(delta, torch.tensor([1.0, 4.0, 64.0]).view(3, 1, 1, 1))
    assert L0().norm(kept).tolist() == [1.0, 4.0, 64.0]


@pytest.mark.parametrize(("spec", "error"), [("spatial(max_rot=-1)", "max_rot"), ("l0(k=0)", "k"), ("color", "eps")])
def test_bad_parameters_are_rejected_by_name(spec, error):
    with pytest.raises((ValueError, TypeError), match=error):
        A.make(spec)


# --- strength on a trained model --------------------------------------------------------------------


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_each_attack_beats_a_random_draw_from_its_own_threat_model(erm_model, mnist_batch):
    x, y = mnist_batch[0][:100], mnist_batch[1][:100]
    torch.manual_seed(0)
    random_spatial = transforms.spatial_transform(x, (2 * torch.rand(100, 3) - 1) * torch.tensor([30.0, 3.0, 3.0]))
    random_l0 = (x + L0().uniform(x, torch.full((100, 1, 1, 1), 30.0))).clamp(0, 1)
    worst = {s: accuracy(erm_model, A.make(s)(erm_model, x, y), y) for s in
             ("spatial", "spatial_grid", "l0(k=30)", "color(eps=0.5)")}  # fmt: skip
    assert worst["spatial"] < accuracy(erm_model, random_spatial, y) - 0.1
    assert worst["spatial_grid"] < accuracy(erm_model, random_spatial, y) - 0.1
    assert worst["l0(k=30)"] < accuracy(erm_model, random_l0, y) - 0.2
    assert worst["color(eps=0.5)"] < accuracy(erm_model, x, y)


def test_a_generator_fitted_to_the_model_beats_noise_and_keeps_learning_across_calls(erm_model, mnist_batch):
    x, y = mnist_batch[0][:100], mnist_batch[1][:100]
    torch.manual_seed(0)
    noise = accuracy(erm_model, A.make("noise(eps=0.3)")(erm_model, x, y), y)
    assert accuracy(erm_model, A.make("generator(eps=0.3, steps=60)")(erm_model, x, y), y) < noise - 0.15
    persistent = A.GeneratorAttack(0.3, steps=20)
    first = accuracy(erm_model, persistent(erm_model, x, y), y)
    second = accuracy(erm_model, persistent(erm_model, x, y), y)  # 20 more steps on the same generator
    assert second <= first
    copy = A.GeneratorAttack(0.3, steps=0)
    copy.load_state_dict(persistent.state_dict(), like=x)
    assert torch.equal(copy(erm_model, x, y), persistent.perturb(x).detach().clamp(0, 1))  # checkpoint round trip
    assert all(p.grad is None for p in erm_model.parameters())


def test_new_families_are_training_tasks_and_held_out_evaluators(tiny_model):
    x, y = digits(16), torch.arange(16) % 10
    tasks = ma.AttackDistribution(["spatial(max_rot=15, steps=2)", "l0(k=5, steps=2)"], seed=0).sample(2)
    for task in tasks:
        params = dict(tiny_model.named_parameters())
        out = task(ma.functional.model_fn(tiny_model, params, dict(tiny_model.named_buffers())), x, y)
        assert out.shape == x.shape
    report = ma.evaluate(tiny_model, (x, y), ["spatial_grid(n=2)", "color(eps=0.1, steps=2)"], n_examples=8)
    assert set(report.per_attack) == {"spatial_grid(max_rot=30.0, max_trans=3.0, n=2)",
                                      "color(eps=0.1, steps=2, random_start=True)"}  # fmt: skip


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return ma.models.SmallCNN(hidden=16).eval()
