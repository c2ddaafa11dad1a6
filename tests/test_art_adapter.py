"""The ART adapter: ``art:NAME(...)`` runs Adversarial Robustness Toolbox evasion attacks against any model
callable, as a second independent evaluator (it has an L1 AutoPGD, which torchattacks lacks)."""

import numpy as np
import pytest
import torch

import metaadv.attacks as A
from metaadv.models import SmallCNN

APGD_L1 = "art:AutoProjectedGradientDescent(norm=1, eps=5.0, eps_step=1.0, max_iter=3, nb_random_init=1)"


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    return SmallCNN(hidden=16).eval(), x, torch.arange(6)


def test_spec_is_canonical_and_the_threat_model_follows_the_norm_argument():
    a = A.make(APGD_L1)
    assert A.make(a.spec) == a and a.norm == "l1" and a.eps == 5.0
    assert "verbose=False" in a.spec and "batch_size=256" in a.spec  # our defaults, shown
    assert A.make("art:AutoProjectedGradientDescent(norm=2, eps=1.0)").norm == "l2"
    assert A.make("art:AutoProjectedGradientDescent").norm == "linf"  # ART's default norm=np.inf


def test_output_is_inside_the_ball_and_the_image_range(tiny):
    model, x, y = tiny
    x_adv = A.make(APGD_L1)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).flatten(1).abs().sum(1).max() <= 5.0 * (1 + 1e-4)
    assert (x_adv - x).abs().max() > 0


def test_seeded_by_torch_and_numpy_global_state_left_alone(tiny):
    model, x, y = tiny
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(A.make(APGD_L1.replace("nb_random_init=1", "nb_random_init=2"))(model, x, y))
    assert torch.equal(runs[0], runs[1])
    assert np.array_equal(np.random.get_state()[1], before)


def test_unknown_attacks_and_bad_values_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown ART evasion attack 'NoSuchAttack'"):
        A.make("art:NoSuchAttack(eps=1.0)")
    with pytest.raises(ValueError, match="ART rejected"):
        A.make("art:AutoProjectedGradientDescent(norm=3)")
