"""Baselines: every method trains; MSD keeps the max-loss norm per example and stays in the union of the balls;
TRADES with beta=0 is ERM and crafts in eval mode; wrong attack lists raise clear errors. Tiny budgets (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaadv.attacks as A
from metaadv.baselines import METHODS, adversarial_loss, adversarial_train, training_attacks
from metaadv.engine import NonFiniteLossError
from metaadv.models import SmallCNN
from metaadv.training_methods.trades import kl_ascent

LP3 = ["pgd_linf(eps=0.3, steps=2)", "pgd_l2(eps=2.0, steps=2)", "pgd_l1(eps=10, steps=2)"]
METHOD_ATTACKS = {
    "erm": [],
    "pgd_at": ["pgd_linf(eps=0.3, steps=2)"],
    "fast_at": ["fgsm_rs(eps=0.3)"],
    "avg": LP3,
    "max": LP3,
    "msd": ["msd(steps=2)"],
    "msd_from_lp": LP3,
    "trades": ["pgd_linf(eps=0.3, steps=2)"],
    "sat": ["pgd_linf(eps=0.3, steps=2)", "pgd_l1(eps=10, steps=2)"],
    "ramp": LP3,
}


@pytest.fixture(scope="module")
def digits(mnist5k):
    """256 training digits: x (256, 1, 28, 28) in [0, 1], y (256,)."""
    train, _ = mnist5k
    return train.x[:256].clone(), train.y[:256].clone()


@pytest.fixture(scope="module")
def trained(digits):
    """A SmallCNN(hidden=32) after 40 ERM steps (batch 32, Adam 2e-3): trained-ish (~90% on these digits), eval mode."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    adversarial_train(model, digits, method="erm", steps=40, batch_size=32, lr=2e-3, device="cpu", progress=False)
    with torch.no_grad():
        assert (model.eval()(digits[0][:64]).argmax(1) == digits[1][:64]).float().mean() > 0.8
    return model


def lp_norms(d: torch.Tensor) -> dict[str, torch.Tensor]:
    d = d.double().flatten(1)
    return {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# --- every method trains ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(METHOD_ATTACKS))
def test_every_method_runs_and_changes_the_parameters(digits, case):
    method = case.removesuffix("_from_lp")
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adversarial_train(
        model, digits, METHOD_ATTACKS[case], method=method, steps=2, batch_size=32, device="cpu", progress=False
    )
    assert result.model is model and not model.training
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(list(model.parameters())), f"{method}: unchanged {set(before) - set(changed)}"


def test_every_method_is_covered():
    assert {c.removesuffix("_from_lp") for c in METHOD_ATTACKS} == set(METHODS)


def test_max_loss_is_at_least_avg_loss_over_several_norms(trained, digits):
    x, y = digits[0][:32], digits[1][:32]
    losses = {}
    for method in ("avg", "max"):
        torch.manual_seed(1)  # the same random starts for both
        losses[method] = adversarial_loss(trained, LP3, x, y, method).detach()
    assert bool((losses["max"] >= losses["avg"] - 1e-6).all())
    assert float(losses["max"].mean()) > float(losses["avg"].mean())


def test_sat_trains_each_batch_on_one_attack_drawn_uniformly(trained, digits):
    """With attacks (none, PGD), each call's loss is the clean loss or the PGD loss, as the global RNG's
    next draw says (so a checkpointed run resumes exactly), and both are drawn about equally often."""
    x, y = digits[0][:16], digits[1][:16]
    clean = ce(trained, x, y)
    picks = []
    for seed in range(40):
        torch.manual_seed(seed)
        picks.append(int(torch.randint(2, ())))
        torch.manual_seed(seed)
        loss = adversarial_loss(trained, ["none", "pgd_linf(eps=0.3, steps=3)"], x, y, "sat").detach()
        assert torch.allclose(loss, clean) == (picks[-1] == 0)
    assert 10 <= sum(picks) <= 30


# --- MSD ----------------------------------------------------------------------------------------------

# Radii at which no norm dominates on the trained-ish model: each wins the first step for some digits.
EPS = {"linf": 0.1, "l2": 1.5, "l1": 8.0}


def test_msd_step_keeps_the_max_loss_norm_per_example(trained, digits):
    """From a zero start, one MSD step equals, per example, the one-step PGD of the norm with the highest loss."""
    x, y = digits[0][:64], digits[1][:64]
    singles = torch.stack(
        [A.make(f"pgd_{n}(eps={e}, steps=1, random_start=False)")(trained, x, y) for n, e in EPS.items()]
    )  # (3, B, C, H, W), Linf, L2, L1: the three candidates of MSD's first step
    losses = torch.stack([ce(trained, s, y) for s in singles])  # (3, B)
    winner = losses.argmax(0)
    assert len(winner.unique()) >= 2, "the case must make different norms win for different examples"
    x_msd = A.make("msd(eps_linf={linf}, eps_l2={l2}, eps_l1={l1}, steps=1)".format(**EPS))(trained, x, y)
    assert torch.equal(x_msd, singles[winner, torch.arange(len(y))])
    assert torch.allclose(ce(trained, x_msd, y), losses.max(0).values)


def test_msd_is_at_least_as_strong_as_each_single_norm_pgd(trained, digits):
    x, y = digits[0][:48], digits[1][:48]
    torch.manual_seed(0)
    single = {n: ce(trained, A.make(f"pgd_{n}(eps={e}, steps=4)")(trained, x, y), y).mean() for n, e in EPS.items()}
    msd = ce(trained, A.make("msd(eps_linf={linf}, eps_l2={l2}, eps_l1={l1}, steps=4)".format(**EPS))(trained, x, y), y)
    assert float(msd.mean()) >= max(map(float, single.values())) - 0.02, (float(msd.mean()), single)


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("drop", [None, "eps_l1"])
def test_msd_result_lies_in_the_union_of_the_balls_and_in_the_image_range(random_start, drop):
    torch.manual_seed(0)
    model = SmallCNN(hidden=32).eval()
    x = torch.rand(8, 1, 28, 28)
    x = torch.where(x < 0.4, torch.zeros_like(x), torch.where(x > 0.8, torch.ones_like(x), x))  # exact 0s and 1s
    y = torch.arange(8)
    eps = {"eps_linf": torch.linspace(0.05, 0.3, 8), "eps_l2": torch.full((8,), 1.5), "eps_l1": torch.full((8,), 6.0)}
    if drop:
        eps[drop] = None
    x_adv = A.make(f"msd(steps=3, random_start={random_start})")(model, x, y, **eps)
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    norms = lp_norms(x_adv - x)
    inside = [norms[k.removeprefix("eps_")] <= e.double() * (1 + 1e-6) + 1e-6 for k, e in eps.items() if e is not None]
    assert bool(torch.stack(inside).any(0).all()), (norms, eps)


def test_msd_from_lp_attacks_attacks_their_union():
    tasks = ["fgsm(eps=0.3)", "pgd_linf(eps=0.2, steps=10)", "pgd_l2(eps=2.0, steps=5)"]
    (attack,) = training_attacks("msd", tasks)
    assert attack == A.make("msd(eps_linf=0.3, eps_l2=2.0, eps_l1=None, steps=10)")
    (same,) = training_attacks("msd", ["msd(steps=3)"])
    assert same == A.make("msd(steps=3)") and same.norm is None


# --- TRADES -------------------------------------------------------------------------------------------


def test_trades_with_beta_zero_is_erm(digits):
    x, y = digits[0][:32], digits[1][:32]
    torch.manual_seed(0)
    model = SmallCNN(hidden=32).train()
    trades = adversarial_loss(model, ["pgd_linf(eps=0.3, steps=2)"], x, y, "trades", beta=0.0)
    assert torch.allclose(trades, adversarial_loss(model, [], x, y, "erm"))
    assert model.training
    params = {}
    for method, attacks in (("erm", []), ("trades", ["pgd_linf(eps=0.3, steps=2)"])):
        torch.manual_seed(0)
        m = SmallCNN(hidden=32)
        adversarial_train(m, digits, attacks, method=method, beta=0.0, steps=2, batch_size=32, progress=False)
        params[method] = dict(m.named_parameters())
    for k, v in params["erm"].items():
        assert torch.allclose(v, params["trades"][k], atol=1e-6), k


def test_trades_crafts_in_eval_mode_then_trains_in_the_model_mode(digits):
    class Recorder(SmallCNN):
        def forward(self, x):
            self.modes.append(self.training)
            return super().forward(x)

    x, y = digits[0][:16], digits[1][:16]
    model = Recorder(hidden=32).train()
    model.modes = []
    adversarial_loss(model, ["pgd_linf(eps=0.3, steps=3)"], x, y, "trades")
    # crafting: clean prediction + 3 ascent steps in eval mode; then the clean and adversarial forwards
    assert model.modes == [False] * 4 + [True] * 2 and model.training


def test_trades_ascent_raises_the_kl_inside_the_ball(trained, digits):
    x = digits[0][:32]
    torch.manual_seed(0)
    x_adv = kl_ascent(trained, x, A.make("pgd_linf(eps=0.1, steps=5)"))
    assert float(lp_norms(x_adv - x)["linf"].max()) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        log_p = F.log_softmax(trained(x), 1)

        def kl(z):
            return F.kl_div(F.log_softmax(trained(z), 1), log_p, reduction="batchmean", log_target=True)

        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        assert float(kl(x_adv)) > 100 * float(kl(start)) and float(kl(x_adv)) > 1e-3


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "sgd"}, "method must be one of"),
        ({"method": "erm", "attacks": ["fgsm(eps=0.3)"]}, "takes exactly 0 attack(s), got 1"),
        ({"method": "pgd_at"}, "takes exactly 1 attack(s), got 0"),
        ({"method": "pgd_at", "attacks": ["fgsm(eps=0.3)", "fgsm(eps=0.1)"]}, "exactly 1 attack(s), got 2"),
        ({"method": "avg"}, "at least 1 attack(s), got 0"),
        ({"method": "fast_at", "attacks": ["pgd_linf(eps=0.3)"]}, "fgsm_rs attack"),
        ({"method": "msd"}, "at least 1 attack(s), got 0"),
        ({"method": "msd", "attacks": ["cw_l2", "pgd_l2(eps=2.0)"]}, "Lp attacks with an eps"),
        ({"method": "msd", "attacks": ["msd", "pgd_l2(eps=2.0)"]}, "got ['msd(eps_linf"),
        ({"method": "trades", "attacks": ["msd"]}, "one Lp attack with an eps"),
        ({"method": "trades", "attacks": LP3}, "exactly 1 attack(s), got 3"),
        ({"method": "trades", "attacks": LP3[:1], "clean_weight": 0.5}, "clean_weight does not apply"),
        ({"method": "trades", "attacks": LP3[:1], "beta": -1.0}, "beta must be a finite number >= 0"),
        ({"method": "pgd_at", "attacks": ["pgd_lin(eps=0.3)"]}, "unknown attack 'pgd_lin'"),
    ],
)
def test_wrong_attacks_raise_clear_errors(digits, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        adversarial_train(SmallCNN(hidden=32), digits, steps=1, progress=False, **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_msd_without_any_ball_raises(digits):
    attack = A.make("msd(eps_linf=None, eps_l2=None, eps_l1=None)")
    with pytest.raises(ValueError, match="at least one of eps_linf"):
        attack(SmallCNN(hidden=32), digits[0][:4], digits[1][:4])


def test_baselines_skip_non_finite_steps_and_stop_after_max_bad_steps():
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.head[-1].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with pytest.raises(NonFiniteLossError) as info:
        adversarial_train(model, (x, y), ["fgsm(eps=0.3)"], steps=5, batch_size=16, max_bad_steps=2, progress=False)
    assert [r["skipped"] for r in info.value.history] == [True, True]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_resumed_baseline_run_equals_an_uninterrupted_one(tmp_path):
    x, y = torch.rand(96, 1, 28, 28), torch.randint(0, 10, (96,))

    def run(steps, **kwargs):
        torch.manual_seed(0)
        model = SmallCNN(hidden=16)
        result = adversarial_train(model, (x, y), ["pgd_linf(eps=0.3, steps=2)"], steps=steps, batch_size=32,
                                   progress=False, **kwargs)  # fmt: skip
        return model.state_dict(), result.history

    straight, _ = run(5)
    _, first = run(2, checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed, history = run(5, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert history[:2] == first, "steps 1-2 come from the checkpoint (their timings too), not a rerun"
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
