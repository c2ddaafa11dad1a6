"""evaluate(): numbers equal hand-computed ones, union is the AND of masks, the model is left untouched,
the support pool is disjoint from the evaluation examples, and both adaptation baselines do what they say."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaadv.attacks import make
from metaadv.data import TensorDataset
from metaadv.eval import RobustnessReport, evaluate, support_bn_statistics
from metaadv.models import SmallCNN

K, N, SIDE = 4, 40, 8  # classes, examples, image side


# ----------------------------------------------------------------------------- a model we can reason about


def reader() -> nn.Module:
    """Linear model whose logit k is pixel (0, k): predicts the column of the hot pixel in row 0."""
    lin = nn.Linear(SIDE * SIDE, K, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[torch.arange(K), torch.arange(K)] = 1.0
    return nn.Sequential(nn.Flatten(), lin)


def ids_of(x: torch.Tensor) -> list[int]:
    return torch.round(x[:, 0, -1, -1] * 100).long().tolist()  # the id lives in the last pixel


def toy_data(clean_wrong: set[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
    """Example i: class i % K as a hot pixel in row 0, id i in the last pixel; clean_wrong: wrong labels."""
    x = torch.zeros(N, 1, SIDE, SIDE)
    cls = torch.arange(N) % K
    x[torch.arange(N), 0, 0, cls] = 1.0
    x[:, 0, -1, -1] = torch.arange(N) / 100
    y = torch.tensor([(c + 1) % K if i in clean_wrong else c for i, c in enumerate(cls.tolist())])
    return x, y


def set_prediction(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, 0, 0, :K] = 0.0
    out[torch.arange(len(x)), 0, 0, cls] = 1.0
    return out


class Flip:
    """A dummy attack: examples whose id is in ``hit`` are made wrong, all others made right."""

    norm = eps = None

    def __init__(self, name: str, hit: set[int]) -> None:
        self.spec, self.name, self.hit = name, name, hit

    def __call__(self, model_fn, x, y):
        hit = torch.tensor([i in self.hit for i in ids_of(x)])
        return set_prediction(x, torch.where(hit, (y + 1) % K, y))


class Spy:
    """Returns its inputs unchanged; records the ids of every batch it sees and the logits on a probe."""

    norm = eps = None

    def __init__(self, spec: str = "spy", probe: torch.Tensor | None = None) -> None:
        self.spec, self.name, self.probe = spec, spec, probe
        self.calls: list[list[int]] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, model_fn, x, y):
        self.calls.append(ids_of(x))
        if self.probe is not None:
            with torch.no_grad():
                self.logits.append(model_fn(self.probe).clone())
        return x


class Sign:
    """A one-step L-inf gradient attack (FGSM), written here so these tests need nothing else."""

    norm, spec, name = "linf", "test_fgsm(eps=0.1)", "test_fgsm"

    def __init__(self, eps: float = 0.1) -> None:
        self.eps = eps

    def __call__(self, model_fn, x, y):
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(model_fn(x), y), x)
        return (x + self.eps * g.sign()).clamp(0, 1).detach()


class Identity:
    norm = eps = None
    spec = name = "identity"

    def __call__(self, model_fn, x, y):
        return x


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(image_size=SIDE, hidden=16)


def image_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, SIDE, SIDE, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- numbers


def test_no_attack_equals_clean_and_numbers_are_hand_computed():
    wrong = {1, 5, 6, 30}
    report = evaluate(reader(), toy_data(wrong), ["none", Identity()])
    assert report.clean_acc == (N - len(wrong)) / N
    assert report.per_attack == {"none": report.clean_acc, "identity": report.clean_acc}
    assert report.union_acc == report.clean_acc
    assert report.n_examples == N and report.attacks == ("none", "identity")
    assert report.adapted == {} and report.adapt_shots == 0


def test_union_is_the_and_of_clean_and_every_attack_mask():
    wrong, a, b = {0, 1}, set(range(0, 10)), {9, 10, 11, 20}
    report = evaluate(reader(), toy_data(wrong), [Flip("a", a), Flip("b", b)], batch_size=7)
    assert report.per_attack == {"a": 1 - len(a) / N, "b": 1 - len(b) / N}
    assert report.union_acc == (N - len(wrong | a | b)) / N
    assert report.union_acc <= min(report.per_attack.values())


def test_same_seed_same_report_and_caller_rng_untouched():
    x, y = image_data()
    model = small_cnn().eval()
    rng = torch.get_rng_state()
    r1 = evaluate(model, (x, y), [Sign()], n_examples=32, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    r2 = evaluate(model, (x, y), [Sign()], n_examples=32, seed=3)
    assert (r1.clean_acc, r1.per_attack) == (r2.clean_acc, r2.per_attack)


# ----------------------------------------------------------------------------- the model is left as it was


def test_eval_mode_during_evaluation_and_modes_params_buffers_restored_bitwise():
    x, y = image_data()
    model = small_cnn().train()
    model.head.eval()  # mixed modes must come back exactly
    before = copy.deepcopy(model.state_dict())
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = []

    class ModeSpy(Sign):
        def __call__(self, model_fn, x, y):
            seen.append(model.training)
            return super().__call__(model_fn, x, y)

    report = evaluate(
        model, (x, y), [ModeSpy()], adapt_shots=8, adapt_steps=2, adapt_methods=("sgd", "bn"), n_examples=32
    )
    assert seen and not any(seen)
    assert model.training and not model.head.training and model.features.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert momenta == [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(report.adapted) == {"sgd", "bn"}


# ----------------------------------------------------------------------------- adaptation


def test_support_pool_is_disjoint_from_evaluation_examples():
    spy = Spy()
    report = evaluate(reader(), toy_data(), [spy], adapt_shots=8, adapt_steps=1, n_examples=32, batch_size=64)
    sets = {frozenset(c) for c in spy.calls}
    assert len(sets) == 2  # the evaluation examples (zero-shot and adapted runs) and the support pool
    support = min(sets, key=len)
    evaluation = max(sets, key=len)
    assert len(support) == 8 and len(evaluation) == 32 == report.n_examples
    assert not support & evaluation
    assert [frozenset(c) for c in spy.calls] == [evaluation, support, evaluation]
    # the evaluation examples do not depend on adapt_shots
    spy0 = Spy()
    evaluate(reader(), toy_data(), [spy0], n_examples=32, batch_size=64)
    assert frozenset(spy0.calls[0]) == evaluation


def test_adapted_results_for_both_methods_and_bn_changes_the_evaluated_model():
    x, y = image_data()
    model = small_cnn().eval()
    spy = Spy("spy", probe=x[:4])
    report = evaluate(model, (x, y), [spy, Sign()], adapt_shots=8, adapt_steps=2, adapt_methods=("sgd", "bn"))
    assert report.n_examples == len(x) - 8
    for method in ("sgd", "bn"):
        assert set(report.adapted[method]) == {"spy", "test_fgsm(eps=0.1)"}
        assert set(report.adapted_clean[method]) == set(report.adapted[method])
        assert 0 <= report.adapted_union[method] <= min(report.adapted[method].values())
    # spy calls: zero-shot, support crafting, then a re-run against each adapted model
    zero, _, sgd_model, bn_model = spy.logits
    assert not torch.allclose(zero, sgd_model)
    assert not torch.allclose(zero, bn_model)


def test_support_bn_buffers_equal_support_statistics_and_mix_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3)).eval()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        buffers["1.running_mean"].fill_(0.5)  # "training" statistics
        buffers["1.running_var"].fill_(2.0)
    before = {k: v.clone() for k, v in buffers.items()}
    x = torch.rand(12, 1, SIDE, SIDE)
    h = model[0](x).detach()
    mean, var = h.mean((0, 2, 3)), h.transpose(0, 1).flatten(1).var(1)  # unbiased, as BatchNorm keeps

    new = support_bn_statistics(model, params, buffers, x, None, batch_size=12)
    torch.testing.assert_close(new["1.running_mean"], mean)
    torch.testing.assert_close(new["1.running_var"], var)
    two = support_bn_statistics(model, params, buffers, x, None, batch_size=6)  # cumulative average of batches
    torch.testing.assert_close(two["1.running_mean"], mean)
    mixed = support_bn_statistics(model, params, buffers, x, 0.25, batch_size=12)
    torch.testing.assert_close(mixed["1.running_mean"], 0.75 * 0.5 + 0.25 * mean)
    torch.testing.assert_close(mixed["1.running_var"], 0.75 * 2.0 + 0.25 * var)
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())
    assert not model.training and model[1].momentum == 0.1


def test_bn_needs_batchnorm_and_unknown_methods_are_rejected():
    with pytest.raises(ValueError, match="'bn'"):
        evaluate(reader(), toy_data(), [Identity()], adapt_shots=4, adapt_methods=("bn",))
    with pytest.raises(ValueError, match=r"allowed: \['sgd', 'bn', 'bn_mix', 'bn_sgd', 'task_bn', 'matched'\]"):
        evaluate(reader(), toy_data(), [Identity()], adapt_shots=4, adapt_methods=("tent",))


# ----------------------------------------------------------------------------- real attacks, real model


def test_real_attacks_on_a_trained_model_native_and_torchattacks_agree(erm_model, mnist_batch):
    specs = [make(s).spec for s in ("fgsm(eps=0.3)", "torchattacks:FGSM(eps=0.3)", "pgd_linf(eps=0.3, steps=3)")]
    report = evaluate(
        erm_model,
        mnist_batch,
        specs,
        n_examples=64,
        adapt_shots=16,
        adapt_steps=2,
        adapt_methods=("sgd", "bn"),
    )
    assert report.attacks == tuple(specs)
    assert report.clean_acc > 0.8
    assert all(acc < report.clean_acc for acc in report.per_attack.values())
    assert report.union_acc <= min(report.per_attack.values())
    fgsm, ta_fgsm = report.per_attack[specs[0]], report.per_attack[specs[1]]
    assert abs(fgsm - ta_fgsm) <= 2 / 64  # the same attack, two implementations
    for method in ("sgd", "bn"):
        assert set(report.adapted[method]) == set(specs)
        assert report.adapted_union[method] <= min(report.adapted[method].values())
    assert not erm_model.training


def test_an_attack_leaving_its_ball_is_flagged():
    class Cheat(Sign):  # steps 0.2 but claims eps 0.05
        def __call__(self, model_fn, x, y):
            return Sign(eps=0.2)(model_fn, x, y)

    cheat = Cheat(eps=0.05)
    with pytest.warns(RuntimeWarning, match="left its linf ball"):
        evaluate(small_cnn().eval(), image_data(), [cheat], n_examples=8)


# ----------------------------------------------------------------------------- the report


def make_report() -> RobustnessReport:
    return evaluate(
        small_cnn().eval(), image_data(), [Sign(), Identity()], adapt_shots=8, adapt_steps=1,
        adapt_methods=("sgd", "bn"), n_examples=16, progress=True,
    )  # fmt: skip


def test_json_round_trip_and_markdown(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="metaadv.eval"):
        report = make_report()
    assert any("sgd@8" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().out == ""  # logging and a tqdm bar on stderr, never print
    back = RobustnessReport.from_json(report.to_json())
    assert back == report
    assert json.loads(report.to_json())["attacks"] == list(report.attacks)
    md = report.to_markdown()
    for spec in report.attacks:
        assert spec in md
    for col in ("zero-shot", "sgd@8", "bn@8", "clean", "union"):
        assert col in md
    assert f"{100 * report.union_acc:.1f}" in md
    with pytest.raises(ValueError, match="unknown"):
        RobustnessReport.from_dict({**report.to_dict(), "extra": 1})


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attacks": []}, ValueError, "empty"),
        ({"adapt_shots": -1}, ValueError, "adapt_shots"),
        ({"n_examples": 0}, ValueError, "n_examples"),
        ({"n_examples": 38, "adapt_shots": 4}, ValueError, "too few"),
        ({"bn_momentum": 1.5}, ValueError, "bn_momentum"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"adapt_shots": 2.5}, TypeError, "adapt_shots"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    args = {"attacks": [Identity()], **kwargs}
    with pytest.raises(error, match=match):
        evaluate(reader(), toy_data(), args.pop("attacks"), **args)


def test_bad_data_raise():
    x, y = toy_data()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(reader(), (x * 2, y), [Identity()])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(reader(), (nan, y), [Identity()])
    with pytest.raises(ValueError, match="4 classes"):
        evaluate(reader(), TensorDataset(x, y + K), [Identity()])
    with pytest.raises(ValueError, match="twice"):
        evaluate(reader(), (x, y), [Identity(), Identity()])
