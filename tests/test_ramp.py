"""RAMP (Jiang & Singh 2024): its loss against a hand computation, the pair it picks, gradient projection against
a hand-computed update, robust fine-tuning on mnist5k beating ERM on a small budget, and clear errors. CPU, tiny."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import metaadv as ma
import metaadv.attacks as A
from metaadv.baselines import adversarial_loss, adversarial_train, gradient_projection
from metaadv.models import SmallCNN
from metaadv.training_methods.ramp import strongest_pair

PAIR = ["fgsm(eps=0.2)", "pgd_l2(eps=1.5, steps=2, random_start=False)"]  # deterministic attacks


@pytest.fixture(scope="module")
def digits(mnist5k):
    """2,048 training digits: x (2048, 1, 28, 28) in [0, 1], y (2048,)."""
    train, _ = mnist5k
    return train.x[:2048].clone(), train.y[:2048].clone()


@pytest.fixture(scope="module")
def erm(mnist5k):
    """SmallCNN(hidden=32) after one ERM epoch over the 4,000 training digits (62 steps of 64, Adam 2e-3): ~94%
    clean test accuracy; eval mode."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    adversarial_train(model, mnist5k[0], method="erm", epochs=1, batch_size=64, lr=2e-3, device="cpu", progress=False)
    return model


def test_ramp_loss_matches_a_hand_computation(erm, digits):
    """In eval mode (fixed BN statistics) with deterministic attacks the loss is reproducible by hand:
    max CE over the pair + lambda * mean over the q-correct examples of KL(p_q || p_r), q the weaker attack."""
    x, y = digits[0][:64], digits[1][:64]
    model = copy.deepcopy(erm).eval()
    advs = [A.make(a)(model, x, y) for a in PAIR]
    with torch.no_grad():
        logits = [model(a) for a in advs]
        acc = [float((z.argmax(1) == y).float().mean()) for z in logits]
        r = min(range(2), key=lambda i: (acc[i], -float(F.cross_entropy(logits[i], y))))
        log_q, log_r = F.log_softmax(logits[1 - r], 1), F.log_softmax(logits[r], 1)
        correct = log_q.argmax(1) == y
        kl = (log_q.exp() * (log_q - log_r)).sum(1)
        ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits]).max(0).values
        loss_0 = adversarial_loss(model, PAIR, x, y, "ramp", ramp_lambda=0.0)
        loss_2 = adversarial_loss(model, PAIR, x, y, "ramp", ramp_lambda=2.0)
    assert 0 < int(correct.sum()) < len(y), "the case must have q-correct and q-wrong examples"
    assert torch.allclose(loss_0, ce, atol=1e-6)
    assert torch.allclose(loss_2.mean(), ce.mean() + 2.0 * kl[correct].mean(), atol=1e-5)
    assert torch.allclose(loss_2[~correct], ce[~correct], atol=1e-6), "no pairing term where x_q is misclassified"
    assert float(loss_2.mean()) > float(loss_0.mean()) + 1e-3


def test_ramp_pairs_the_two_strongest_attacks_of_the_batch(erm, digits):
    """Of (none, a weak FGSM, a strong PGD), r is PGD and q FGSM; with lambda=0 the loss is their MAX."""
    x, y = digits[0][:64], digits[1][:64]
    model = copy.deepcopy(erm).eval()
    attacks = ["none", "fgsm(eps=0.05)", "pgd_linf(eps=0.3, steps=3, random_start=False)"]
    advs = [A.make(a)(model, x, y) for a in attacks]
    assert strongest_pair(model, advs, y) == (1, 2)
    with torch.no_grad():
        loss = adversarial_loss(model, attacks, x, y, "ramp", ramp_lambda=0.0)
        expected = adversarial_loss(model, attacks[1:], x, y, "max")
    assert torch.allclose(loss, expected, atol=1e-6)


def run(digits, steps=2, n=64, **kwargs):
    """Train a fresh seeded SmallCNN(hidden=16) with ramp on n digits, batch 32; returns (initial params, model,
    history)."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = adversarial_train(model, (digits[0][:n], digits[1][:n]), PAIR, method="ramp", steps=steps,
                               batch_size=32, device="cpu", progress=False, **kwargs)  # fmt: skip
    return init, model, result.history


def params_differ(a, b) -> bool:
    return any(not torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_logit_pairing_changes_the_update_and_lambda_zero_without_gp_is_max(digits):
    _, no_pair, _ = run(digits, ramp_lambda=0.0, ramp_beta=0.0)
    _, paired, _ = run(digits, ramp_lambda=5.0, ramp_beta=0.0)
    no_pair, paired = dict(no_pair.named_parameters()), dict(paired.named_parameters())
    assert params_differ(no_pair, paired)
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    adversarial_train(model, (digits[0][:64], digits[1][:64]), PAIR, method="max", steps=2, batch_size=32,
                      device="cpu", progress=False)  # fmt: skip
    for k, v in model.named_parameters():  # same examples; only the order inside the BN batch differs
        assert torch.allclose(v, no_pair[k], atol=1e-5), k


def test_gradient_projection_formula():
    a = torch.tensor([1.0, 2.0, 0.0])
    beta = 0.3
    (same,), _ = gradient_projection([a], [a], beta)
    assert torch.allclose(same, a)
    for opposed in (-a, torch.tensor([2.0, -1.0, 5.0]), torch.zeros(3)):  # cos <= 0: the clean gradient is dropped
        (g,), cos = gradient_projection([a], [opposed], beta)
        assert torch.allclose(g, (1 - beta) * a) and float(cos) <= 1e-7
    n = torch.tensor([1.0, 0.0, 1.0])
    (g,), cos = gradient_projection([a], [n], beta)
    expected_cos = float(a @ n / (a.norm() * n.norm()))
    assert float(cos) == pytest.approx(expected_cos) and torch.allclose(g, (1 - beta) * a + beta * expected_cos * n)


def test_gp_step_equals_the_hand_projected_update_and_keeps_the_bn_statistics(digits):
    """One SGD step (its first step is -lr * g): with GP it equals -lr * GP(g_a, g_n), where g_a is the step
    without GP (same attacks, same batch) and g_n the clean gradient with batch statistics; the logged loss and
    the BatchNorm running statistics are those of the step without GP. One batch of all 32 digits (in fit's
    order, which neither the mean loss nor the batch statistics depend on)."""
    lr, beta = 0.05, 0.5
    init, plain, h_plain = run(digits, steps=1, n=32, ramp_beta=0.0, optimizer="sgd", lr=lr)
    _, projected, h_gp = run(digits, steps=1, n=32, ramp_beta=beta, optimizer="sgd", lr=lr)
    g_adv = [(init[k] - v.detach()) / lr for k, v in plain.named_parameters()]
    clean = SmallCNN(hidden=16).train()  # a training-mode forward normalizes with the batch's statistics
    clean.load_state_dict(init, strict=False)
    g_nat = torch.autograd.grad(F.cross_entropy(clean(digits[0][:32]), digits[1][:32]), list(clean.parameters()))
    expected, _ = gradient_projection(g_adv, g_nat, beta)
    for (k, v), g in zip(projected.named_parameters(), expected, strict=True):
        assert torch.allclose(v, init[k] - lr * g, atol=1e-5), k
    assert params_differ(dict(plain.named_parameters()), dict(projected.named_parameters()))
    assert h_gp[0]["loss"] == pytest.approx(h_plain[0]["loss"], rel=1e-6) and -1 <= h_gp[0]["gp_cos"] <= 1
    assert "gp_cos" not in h_plain[0]
    for k, v in plain.named_buffers():
        assert torch.equal(v, dict(projected.named_buffers())[k]), k


def test_ramp_fine_tuning_beats_erm_under_its_attacks(erm, digits, mnist5k):
    """20 RAMP steps from an ERM model (robust fine-tuning, the paper's main setting): the loss falls and the
    union accuracy under the training attacks (PGD-10 at evaluation) on 128 test digits rises well above ERM's."""
    _, test = mnist5k
    attacks = ["pgd_linf(eps=0.2, steps=3)", "pgd_l2(eps=1.5, steps=3)"]
    evaluated = ["pgd_linf(eps=0.2, steps=10)", "pgd_l2(eps=1.5, steps=10)"]
    model = copy.deepcopy(erm)
    result = adversarial_train(model, (digits[0][:1024], digits[1][:1024]), attacks, method="ramp", steps=20,
                               batch_size=32, device="cpu", progress=False)  # fmt: skip
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    before = ma.evaluate(erm, test, evaluated, n_examples=128)
    after = ma.evaluate(model, test, evaluated, n_examples=128)
    assert after.union_acc > before.union_acc + 0.1, (before.union_acc, after.union_acc)
    assert after.clean_acc > 0.7, after.clean_acc


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"attacks": PAIR[:1]}, "takes at least 2 attack(s), got 1"),
        ({"attacks": [PAIR[0], PAIR[0]]}, "an attack is listed twice"),
        ({"attacks": PAIR, "ramp_lambda": -1.0}, "ramp_lambda must be a finite number >= 0, got -1.0"),
        ({"attacks": PAIR, "ramp_lambda": float("inf")}, "ramp_lambda must be a finite number >= 0"),
        ({"attacks": PAIR, "ramp_beta": 1.5}, "ramp_beta must be in [0, 1], got 1.5"),
        ({"attacks": PAIR, "ramp_beta": True}, "ramp_beta must be in [0, 1], got True"),
        ({"attacks": PAIR, "ramp_beta": "0.5"}, "ramp_beta must be in [0, 1]"),
    ],
)
def test_bad_ramp_options_raise_clear_errors(digits, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        adversarial_train(SmallCNN(hidden=16), digits, method="ramp", steps=1, progress=False, **kwargs)
    assert fragment in str(info.value), str(info.value)
