"""The registry of training methods: ``metaadv.methods()`` lists them, ``metaadv.train`` trains each one exactly
as its own entry point does (``adversarial_train``, ``meta_train``), wrong names and settings raise, and
``metaadv train --method`` writes run directories that ``metaadv eval`` reads and ``--resume`` continues.
Tiny models on 64 random images, 2 steps (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import same_weights

import metaadv as ma
from metaadv import training_methods
from metaadv.baselines import adversarial_train
from metaadv.cli import main
from metaadv.models import SmallCNN
from metaadv.runs import load_run
from metaadv.training_methods.meta import settings_of

BASELINES = ["erm", "pgd_at", "fast_at", "trades", "avg", "max", "msd", "sat", "ramp"]
SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=1)"]


def tiny_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(hidden=16)


# --- the registry -------------------------------------------------------------------------------------


def test_methods_lists_every_baseline_then_the_meta_methods():
    assert ma.methods() == [*BASELINES, "meta", "meta_fo", "meta_so"]
    for name in ma.methods():
        method = training_methods.get(name)
        assert method.name == name and method.summary and "\n" not in method.summary
        assert method.meta == name.startswith("meta")
    assert training_methods.get("erm").attacks == (0, 0) and training_methods.get("ramp").attacks == (2, None)
    assert training_methods.get("trades").settings == {"beta": 6.0}
    assert "first_order" in training_methods.get("meta").settings
    assert "first_order" not in training_methods.get("meta_so").settings
    assert ma.methods is training_methods.methods and ma.train is training_methods.train


def test_train_avg_trains_the_model_in_place_for_the_loops_steps(images):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop = ma.LoopConfig(steps=2, batch_size=32, device="cpu")
    result = ma.train("avg", model, images, SPECS, loop=loop, progress=False)
    assert result.model is model and not model.training
    assert [r["step"] for r in result.history] == [1, 2] and result.artifacts == {}
    assert all(not torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_train_equals_adversarial_train_bitwise(images):
    loop = {"steps": 2, "batch_size": 32, "lr": 2e-3, "seed": 3, "device": "cpu"}
    via_registry = ma.train("pgd_at", tiny_model(), images, SPECS[1:], loop=ma.LoopConfig(**loop), progress=False,
                            clean_weight=0.25)  # fmt: skip
    direct = adversarial_train(tiny_model(), images, SPECS[1:], method="pgd_at", clean_weight=0.25, progress=False,
                               **loop)  # fmt: skip
    assert same_weights(via_registry.model, direct.model)
    assert [r["loss"] for r in via_registry.history] == [r["loss"] for r in direct.history]


def test_meta_through_train_equals_meta_train_bitwise(images):
    config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=2, device="cpu", seed=1)
    direct = ma.meta_train(tiny_model(), images, ma.AttackDistribution(SPECS, seed=1), config, progress=False)
    given = ma.train("meta", tiny_model(), images, ma.AttackDistribution(SPECS, seed=1), loop=config.loop,
                     progress=False, **settings_of("meta", config))  # fmt: skip
    # specs: a uniform distribution seeded with loop.seed
    from_specs = ma.train("meta_so", tiny_model(), images, SPECS, loop=config.loop, progress=False,
                          tasks_per_batch=2, support_size=8, query_size=8)  # fmt: skip
    for result in (given, from_specs):
        assert same_weights(result.model, direct.model)
        assert [r["loss"] for r in result.history] == [r["loss"] for r in direct.history]


def test_meta_fo_is_meta_with_first_order_and_takes_its_batch_from_the_settings(images):
    settings = {"tasks_per_batch": 1, "support_size": 8, "query_size": 8}
    loop = ma.LoopConfig(steps=2, batch_size=16, device="cpu")
    fo = ma.train("meta_fo", tiny_model(), images, SPECS[:1], loop=loop, progress=False, **settings)
    meta = ma.train("meta", tiny_model(), images, SPECS[:1], loop=loop, progress=False, first_order=True, **settings)
    assert same_weights(fo.model, meta.model)
    default = ma.train("meta_fo", tiny_model(), images, SPECS[:1], progress=False, **settings)  # no loop: 16 per step
    assert len(default.history) == 3 * (64 // 16)  # LoopConfig's 3 epochs


@pytest.mark.parametrize(
    ("method", "attacks", "kwargs", "fragment"),
    [
        ("pgdat", SPECS, {}, "method must be one of ['erm', 'pgd_at'"),
        ("pgd_at", SPECS[1:], {"beta": 1.0}, "beta does not apply to method 'pgd_at'; its settings: ['clean_weight']"),
        ("meta_so", SPECS, {"first_order": True}, "first_order does not apply to method 'meta_so'"),
        ("meta", SPECS, {"outer_lr": 0.1}, "outer_lr does not apply to method 'meta'"),
        ("erm", SPECS, {}, "method 'erm' takes exactly 0 attack(s), got 2"),
        ("ramp", SPECS, {"ramp_beta": 2.0}, "ramp_beta must be in [0, 1], got 2.0"),
        ("meta", SPECS, {"loop": ma.LoopConfig(batch_size=32)}, "loop.batch_size=32, but a step of method 'meta'"),
    ],
)
def test_wrong_methods_settings_and_loops_raise_naming_what_is_allowed(images, method, attacks, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        ma.train(method, tiny_model(), images, attacks, progress=False, **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_a_run_config_names_a_registered_method_and_baseline_sections():
    base = {"tasks": {"specs": SPECS}}
    assert ma.RunConfig.from_dict(base).method == "meta"
    with pytest.raises(ValueError, match="method must be one of"):
        ma.RunConfig.from_dict({**base, "method": "pgdat"})
    with pytest.raises(ValueError, match="'meta_so' is not a baseline"):
        ma.RunConfig.from_dict({**base, "methods": {"meta_so": {"inner_lr": 0.1}}})
    with pytest.raises(ValueError, match=r"unknown methods.pgd_at option\(s\) \['beta'\]"):
        ma.RunConfig.from_dict({**base, "methods": {"pgd_at": {"beta": 1.0}}})
    with pytest.raises(ValueError, match=r"methods\.trades\.attacks must be a list"):
        ma.RunConfig.from_dict({**base, "methods": {"trades": {"attacks": "pgd_linf(eps=0.3)"}}})


# --- the CLI --------------------------------------------------------------------------------------------

CONFIG = """\
tasks: {specs: ['fgsm(eps=0.3)', 'pgd_linf(eps=0.3, steps=1)']}
model: {name: SmallCNN, hidden: 16}
meta: {tasks_per_batch: 1, support_size: 8, query_size: 8}
methods: {pgd_at: {attacks: ['pgd_linf(eps=0.3, steps=1)'], clean_weight: 0.5}}
eval: {attacks: ['fgsm(eps=0.1)'], n_examples: 16}
"""


def cli_train(tmp_path: Path, name: str, *args: str) -> Path:
    (tmp_path / "run.yaml").write_text(CONFIG)
    out = tmp_path / name
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", *args]) == 0
    return out


def test_cli_trains_a_baseline_into_a_run_directory_that_eval_reads_and_resume_continues(tmp_path, capsys):
    out = cli_train(tmp_path, "run", "--method", "pgd_at", "--steps", "2")
    assert capsys.readouterr().out.startswith("training SmallCNN with pgd_at on mnist5k against 1 attack(s)")
    assert json.loads((out / "config.json").read_text())["method"] == "pgd_at"
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    cfg, model, options = load_run(out)
    assert cfg.method == "pgd_at" and type(model) is SmallCNN and options == {}  # no meta options on a baseline
    assert main(["eval", "--checkpoint", str(out), "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["n_examples"] == 16

    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0  # its own config.json
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    straight = cli_train(tmp_path, "straight", "--method", "pgd_at", "--steps", "3")
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (out, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run equals an uninterrupted one


def test_cli_meta_fo_records_first_order_in_its_meta_section(tmp_path, capsys):
    out = cli_train(tmp_path, "fo", "--method", "meta_fo", "--steps", "1")
    assert capsys.readouterr().out.startswith("meta-training SmallCNN with meta_fo on mnist5k over 2 attack types")
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "meta_fo" and saved["meta"]["first_order"] is True
