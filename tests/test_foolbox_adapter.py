"""The Foolbox adapter: ``foolbox:NAME(..., eps=...)`` runs Foolbox 3 attacks against any model callable;
its FMN is the strongest L1 attack we measured (docs/attacks.md)."""

import pytest
import torch

import metaadv.attacks as A
from metaadv.models import SmallCNN


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model, x = SmallCNN(hidden=16).eval(), torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        return model, x, model(x).argmax(1)  # all correct: a minimum-norm attack must move every image


def test_spec_is_canonical_eps_is_the_radius_and_the_norm_follows_the_class():
    a = A.make("foolbox:L1FMNAttack(steps=5, eps=5.0)")
    assert A.make(a.spec) == a and a.norm == "l1" and a.eps == 5.0
    assert A.make("foolbox:LinfPGD(eps=0.3)").norm == "linf"
    assert A.make("foolbox:L2FMNAttack").eps is None  # minimum norm, unbounded


CASES = [("L1FMNAttack(steps=20, eps=60.0)", 1, 60.0), ("L2PGD(eps=1.0)", 2, 1.0)]


@pytest.mark.parametrize(("spec", "norm", "eps"), CASES)
def test_clipped_output_is_inside_the_ball_and_the_image_range(tiny, spec, norm, eps):
    model, x, y = tiny
    x_adv = A.make(f"foolbox:{spec}")(model, x, y)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).flatten(1).norm(p=norm, dim=1).max() <= eps * (1 + 1e-4)
    assert (x_adv - x).abs().max() > 0


def test_unknown_attacks_and_bad_values_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown Foolbox attack 'Nope'"):
        A.make("foolbox:Nope")
    with pytest.raises(ValueError, match="steps must be > 0"):
        A.make("foolbox:L1FMNAttack(steps=0)")
