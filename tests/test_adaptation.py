"""The adaptations at test time beyond plain fine-tuning and BN statistics: "matched" is the meta-training inner
loop (bit for bit a hand-written ``adapt`` in training-mode BatchNorm), "bn_sgd" is "bn" then "sgd", "bn_mix" is
"bn" with a momentum; ``tune_finetuning`` scores every candidate as ``evaluate`` would and picks the best; the
report records each adaptation's settings; ``metaadv eval`` of a meta run offers "matched"."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaadv import MetaConfig, adapt
from metaadv.cli import main
from metaadv.eval import InnerLoopSpec, RobustnessReport, evaluate, support_bn_statistics, tune_finetuning
from metaadv.eval.evaluate import _split
from metaadv.meta.options.step_bn import StepBatchNorm
from metaadv.models import SmallCNN

SIDE, N, SHOTS, K = 8, 40, 8, 4


class Spy:
    """Returns its inputs unchanged and records the logits of every model it attacks on a probe."""

    norm = eps = None
    spec = name = "spy"

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe, self.logits = probe, []

    def __call__(self, model_fn, x, y):
        with torch.no_grad():
            self.logits.append(model_fn(self.probe).clone())
        return x


def bn_model() -> nn.Module:
    """A SmallCNN whose running statistics are far from any batch's (so the BatchNorm rule shows)."""
    torch.manual_seed(0)
    model = SmallCNN(image_size=SIDE, hidden=16).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model


def data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, SIDE, SIDE, generator=g), torch.randint(0, 10, (n,), generator=g)


def support_of(x: torch.Tensor, y: torch.Tensor, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The support pool ``evaluate`` draws with seed 0 (a Spy leaves it unperturbed)."""
    _, idx = _split(len(x), n_examples, SHOTS, 0)
    return x[idx], y[idx]


def adapted_logits(model: nn.Module, x, y, **kwargs) -> torch.Tensor:
    """The probe's logits under the model one adaptation method produced (a Spy's last record)."""
    spy = Spy(x[:5])
    evaluate(model, (x, y), [spy], adapt_shots=SHOTS, **kwargs)
    return spy.logits[-1]


def by_hand(model: nn.Module, x, y, buffers=None, **settings) -> torch.Tensor:
    """``adapt`` on the support set with the whole model in training mode (as meta-training runs it), then the
    probe's logits in eval mode with ``buffers`` (default: the model's own running statistics)."""
    before = copy.deepcopy(model.state_dict())
    x_s, y_s = support_of(x, y)
    theta = adapt(model.train(), x_s, y_s, **settings)
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scratch buffers only
    with torch.no_grad():
        return functional_call(model, {**theta, **(buffers or dict(model.named_buffers()))}, (x[:5],))


# ----------------------------------------------------------------------------- matched


@pytest.mark.parametrize(("inner_params", "proximal"), [("all", 0.0), ("head", 0.5)])
def test_matched_is_the_inner_loop_of_the_config_in_training_mode_batchnorm_bit_for_bit(inner_params, proximal):
    model, (x, y) = bn_model(), data()
    config = MetaConfig(inner_steps=2, inner_lr=0.05, inner_params=inner_params, proximal=proximal)
    got = adapted_logits(model, x, y, adapt_methods=("matched",), inner_loop=InnerLoopSpec.from_config(config))
    want = by_hand(model, x, y, steps=2, lr=0.05, inner_params=inner_params, proximal=proximal)
    assert torch.equal(got, want)
    eval_mode_sgd = adapted_logits(model, x, y, adapt_steps=2, adapt_lr=0.05, adapt_params=inner_params,
                                   adapt_proximal=proximal)  # fmt: skip
    assert not torch.allclose(got, eval_mode_sgd)  # the BatchNorm rule is what differs from "sgd"


def test_matched_uses_meta_sgds_learned_step_sizes_and_refuses_a_config_without_them():
    model, (x, y) = bn_model(), data()
    config = MetaConfig(inner_steps=1, inner_lr=0.01, learn_inner_lr=True)
    g = torch.Generator().manual_seed(2)
    lr = {k: 0.2 * torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}
    spec = InnerLoopSpec.from_config(config, {"inner_lr": lr})
    assert spec.lr is lr and spec.describe()["lr"] == "learned"
    got = adapted_logits(model, x, y, adapt_methods=("matched",), inner_loop=spec)
    assert torch.equal(got, by_hand(model, x, y, steps=1, lr=lr))
    assert not torch.allclose(got, by_hand(model, x, y, steps=1, lr=0.01))
    with pytest.raises(ValueError, match="learn_inner_lr=True but the artifacts lacks 'inner_lr'"):
        InnerLoopSpec.from_config(config)
    with pytest.raises(ValueError, match="learn_inner_lr=False but the artifacts has 'inner_lr'"):
        InnerLoopSpec.from_config(MetaConfig(), {"inner_lr": lr})


def test_matched_with_per_step_statistics_normalizes_the_adapted_model_with_the_last_set():
    model, (x, y) = bn_model(), data()
    step_bn = StepBatchNorm(model, dict(model.named_buffers()), 2)
    for k, v in step_bn.stats[1].items():  # set 2 = K
        if k.endswith("running_mean"):
            v.add_(1.0)
    spec = InnerLoopSpec.from_config(MetaConfig(inner_steps=2, per_step_bn=True), {"step_bn": step_bn})
    got = adapted_logits(model, x, y, adapt_methods=("matched",), inner_loop=spec)
    assert torch.equal(got, by_hand(model, x, y, buffers=step_bn.stats[1], steps=2, lr=0.01))


def test_matched_without_an_inner_loop_is_refused():
    with pytest.raises(ValueError, match="'matched' adapts with the inner loop the model was meta-trained with"):
        evaluate(bn_model(), data(), ["none"], adapt_shots=SHOTS, adapt_methods=("sgd", "matched"))
    with pytest.raises(ValueError, match=r"InnerLoopSpec\.steps"):
        InnerLoopSpec(steps=-1, lr=0.01)


# ----------------------------------------------------------------------------- bn_sgd, bn_mix


def test_bn_sgd_is_bn_statistics_then_sgd_and_bn_mix_is_bn_with_its_momentum():
    model, (x, y) = bn_model(), data()
    got = adapted_logits(model, x, y, adapt_methods=("bn_sgd",), adapt_steps=2, adapt_lr=0.05)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    renormed = copy.deepcopy(model)
    renormed.load_state_dict({**params, **support_bn_statistics(model, params, buffers, support_of(x, y)[0])})
    assert torch.equal(got, adapted_logits(renormed, x, y, adapt_methods=("sgd",), adapt_steps=2, adapt_lr=0.05))
    mix = adapted_logits(model, x, y, adapt_methods=("bn_mix",), bn_mix_momentum=0.3)
    assert torch.equal(mix, adapted_logits(model, x, y, adapt_methods=("bn",), bn_momentum=0.3))
    assert not torch.allclose(mix, adapted_logits(model, x, y, adapt_methods=("bn",)))


def test_the_report_records_each_adaptations_settings():
    model, (x, y) = bn_model(), data()
    spec = InnerLoopSpec.from_config(MetaConfig(inner_steps=1, inner_lr=0.02))
    report = evaluate(model, (x, y), ["none"], adapt_shots=SHOTS, adapt_methods=("sgd", "bn", "bn_mix", "bn_sgd",
                      "matched"), finetune={"sgd": (3, 0.05), "bn_sgd": (0, None)}, inner_loop=spec)  # fmt: skip
    assert report.meta["adapt_methods"] == ["sgd", "bn", "bn_mix", "bn_sgd", "matched"]
    assert report.meta["finetune"] == {"sgd": {"steps": 3, "lr": 0.05}, "bn_sgd": {"steps": 0, "lr": None}}
    assert report.meta["bn_mix_momentum"] == 0.1
    assert report.meta["matched"] == spec.describe() == {
        "steps": 1, "lr": 0.02, "inner_params": "all", "proximal": 0.0, "step_bn": False,
        "bn": "support batch statistics in the inner steps"}  # fmt: skip
    assert report.adapted["bn_sgd"] == report.adapted["bn"]  # no step: the support statistics alone
    assert RobustnessReport.from_json(report.to_json()) == report
    plain = evaluate(model, (x, y), ["none"], adapt_shots=SHOTS, adapt_methods=("bn",))
    assert not {"finetune", "bn_mix_momentum", "matched"} & set(plain.meta)


@pytest.mark.parametrize(
    ("finetune", "match"),
    [({"bn": (1, 0.1)}, "finetune names 'bn'"), ({"bn_sgd": (1, 0.1)}, "finetune names 'bn_sgd'"),
     ({"sgd": (0, 0.1)}, "lr must be None exactly when steps is 0"), ({"sgd": (2, None)}, "lr must be None"),
     ({"sgd": (1, -0.1)}, "lr")],
)  # fmt: skip
def test_bad_finetune_settings_are_refused(finetune, match):
    with pytest.raises(ValueError, match=match):
        evaluate(bn_model(), data(), ["none"], adapt_shots=SHOTS, adapt_methods=("sgd",), finetune=finetune)


# ----------------------------------------------------------------------------- tuning


def wrong_reader() -> nn.Module:
    """Linear: logit k reads pixel (0, (k + 1) % K), so a hot pixel at column c is classified c - 1: wrong."""
    lin = nn.Linear(SIDE * SIDE, K, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[torch.arange(K), (torch.arange(K) + 1) % K] = 1.0
    return nn.Sequential(nn.Flatten(), lin).eval()


def hot_pixels(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % K
    x = torch.zeros(n, 1, SIDE, SIDE)
    x[torch.arange(n), 0, 0, y] = 1.0
    return x, y


def test_tuning_scores_every_candidate_as_evaluate_does_and_picks_the_best():
    model, (x, y) = wrong_reader(), hot_pixels()
    grid = {"steps": [3, 1], "lr": [5.0, 0.5]}  # any order: candidates run steps, then lr, ascending
    tuned = tune_finetuning(model, (x, y), ["none"], SHOTS, grid, n_examples=24)
    assert list(tuned.scores) == [(0, None), (1, 0.5), (1, 5.0), (3, 0.5), (3, 5.0)]
    for (steps, lr), score in tuned.scores.items():
        report = evaluate(model, (x, y), ["none"], adapt_shots=SHOTS, adapt_methods=("sgd",), n_examples=24,
                          finetune={"sgd": (steps, lr)})  # fmt: skip
        assert report.adapted["sgd"]["none"] == score
    assert tuned.scores[(0, None)] == tuned.scores[(3, 0.5)] == 0.0  # too small steps do not flip a prediction
    assert tuned.scores[(3, 5.0)] == 1.0 > tuned.scores[(1, 5.0)] > 0.0  # one best candidate
    assert (tuned.steps, tuned.lr) == (3, 5.0)
    assert json.loads(json.dumps(tuned.to_dict()))["scores"][0] == {"steps": 0, "lr": None, "score": 0.0}


def test_tuning_keeps_the_unadapted_model_on_a_tie_and_bn_sgd_starts_from_bn():
    model, (x, y) = wrong_reader(), hot_pixels()
    right = copy.deepcopy(model)
    with torch.no_grad():
        right[1].weight.copy_(torch.roll(model[1].weight, 1, dims=0))  # logit k reads column k: always right
    tuned = tune_finetuning(right, (x, y), ["none"], SHOTS, {"steps": [1], "lr": [0.01]})
    assert set(tuned.scores.values()) == {1.0} and (tuned.steps, tuned.lr) == (0, None)
    cnn, (xc, yc) = bn_model(), data()
    bn_sgd = tune_finetuning(cnn, (xc, yc), ["none"], SHOTS, {"steps": [1], "lr": [0.05]}, method="bn_sgd")
    bn = evaluate(cnn, (xc, yc), ["none"], adapt_shots=SHOTS, adapt_methods=("bn",))
    assert bn_sgd.scores[(0, None)] == bn.adapted["bn"]["none"]


def test_an_adaptation_that_blows_up_classifies_nothing_and_tuning_passes_it_over(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, K)).eval()
    (x, y), attack = hot_pixels(), "pgd_l2(eps=0.5, steps=3)"  # its gradient on a non-finite model is NaN
    report = evaluate(model, (x, y), [attack], adapt_shots=SHOTS, adapt_methods=("sgd",), finetune={"sgd": (3, 1e19)})
    assert list(report.adapted["sgd"].values()) == list(report.adapted_clean["sgd"].values()) == [0.0]
    assert "not finite" in caplog.text
    tuned = tune_finetuning(model, (x, y), [attack], SHOTS, {"steps": [3], "lr": [0.5, 1e19]}, n_examples=24)
    assert tuned.scores[(3, 1e19)] == 0.0 and (tuned.steps, tuned.lr) != (3, 1e19)


@pytest.mark.parametrize(
    ("grid", "method", "match"),
    [({"steps": [0], "lr": [0.01]}, "sgd", "steps"), ({"steps": [1]}, "sgd", "keys 'steps' and 'lr'"),
     ({"steps": [1, 1], "lr": [0.1]}, "sgd", "twice"), ({"steps": [1], "lr": [0.1]}, "bn", "method must be one of"),
     ({"steps": [1], "lr": [0.1]}, "bn_sgd", "has none")],
)  # fmt: skip
def test_bad_tuning_options_are_refused(grid, method, match):
    with pytest.raises(ValueError, match=match):
        tune_finetuning(wrong_reader(), hot_pixels(), ["none"], SHOTS, grid, method=method)


# ----------------------------------------------------------------------------- metaadv eval


def test_metaadv_eval_of_a_meta_run_adapts_with_its_own_inner_loop(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(
        "tasks: {specs: ['fgsm(eps=0.3)']}\nmodel: {name: SmallCNN, hidden: 16}\n"
        "meta: {tasks_per_batch: 1, support_size: 8, query_size: 8, inner_steps: 2, inner_lr: 0.02,\n"
        "       learn_inner_lr: true}\n"
        "eval: {attacks: ['fgsm(eps=0.1)'], n_examples: 16, adapt_shots: 8, adapt_steps: 1}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--steps", "1", "--quiet"]) == 0
    assert main(["eval", "--checkpoint", str(out), "--adapt-methods", "matched", "sgd", "bn", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["adapted"]) == {"matched", "sgd", "bn"}
    assert report["meta"]["matched"]["steps"] == 2 and report["meta"]["matched"]["lr"] == "learned"
    erm = tmp_path / "erm"
    args = ["--config", str(tmp_path / "run.yaml"), "--method", "erm", "--out", str(erm), "--steps", "1", "--quiet"]
    assert main(["train", *args]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(erm), "--adapt-methods", "matched", "--quiet"]) == 2
    assert "'matched' adapts with the inner loop the model was meta-trained with" in capsys.readouterr().err
