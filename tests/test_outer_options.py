"""Outer-loop options of ``MetaConfig`` inside ``meta_train`` (docs/meta_options.md): task attention and
per-task BatchNorm statistics.

The attention network itself is specified in tests/test_attention.py; here it is trained by meta_train.
"""

import copy
import dataclasses
import json

import pytest
import torch

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.functional import state
from metaadv.meta import meta_batch_loss
from metaadv.meta.options.attention import TaskAttention
from metaadv.meta.options.task_bn import TaskBatchNorm
from metaadv.meta.train import FIRST_FIELDS
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask


def tiny_run(specs, tmp_path=None, steps=4, resume=False, model=None, **options):
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 256)
    torch.manual_seed(0)
    model = SmallCNN(hidden=16) if model is None else copy.deepcopy(model)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return ma.meta_train(model, (x, y), ma.AttackDistribution(specs, seed=0), cfg, progress=False, **where)


def mean_weight(history, name: str) -> float:
    return sum(w for r in history for n, w in zip(r["task_names"], r["task_weights"], strict=True) if n == name) / len(
        history
    )


def test_attention_weights_are_logged_per_task_and_sum_to_one():
    result = tiny_run(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], steps=3, task_attention=True)
    for record in result.history:
        assert len(record["task_weights"]) == len(record["task_names"]) == 2
        assert all(w > 0 for w in record["task_weights"]) and abs(sum(record["task_weights"]) - 1) < 1e-6
    assert result.history[0]["task_weights"] == [0.5, 0.5]  # a fresh network is uniform: plain MAML's first step
    assert isinstance(result.attention, TaskAttention) and not result.attention.training
    plain = tiny_run(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], steps=1)
    assert "task_weights" not in plain.history[0] and "attention" not in plain.artifacts


def test_a_much_harder_attack_type_gets_more_weight(erm_model):
    """On a trained model, clean examples ("none") against PGD: the attention moves weight to PGD."""
    result = tiny_run(["none", "pgd_linf(eps=0.3, steps=5)"], steps=12, model=erm_model, task_attention=True)
    late = result.history[-4:]
    assert mean_weight(late, "pgd_linf") > 0.55  # from 0.5; the closed form softmax(L / tau) gives ~0.65 here
    assert all(max(r["task_weights"]) < 0.999 for r in late)  # the entropy bonus prevents collapse


def test_identical_attack_types_keep_near_uniform_weights(erm_model):
    result = tiny_run(["fgsm(eps=0.2)", "fgsm(eps=0.2)"], steps=12, model=erm_model, task_attention=True)
    assert all(abs(w - 0.5) < 0.1 for r in result.history for w in r["task_weights"])


def test_attention_changes_training_and_a_resume_keeps_its_state(tmp_path):
    specs, options = ["none", "pgd_linf(eps=0.5, steps=2)"], {"task_attention": True}
    whole = tiny_run(specs, steps=4, **options)
    plain = tiny_run(specs, steps=4)
    assert not torch.equal(whole.model.state_dict()["head.3.weight"], plain.model.state_dict()["head.3.weight"])
    tiny_run(specs, tmp_path, steps=2, **options)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert set(saved["state"]["task_attention"]) == set(whole.attention.state_dict())
    assert json.loads(saved["config"])["meta"]["task_attention"] is True
    resumed = tiny_run(specs, tmp_path, steps=4, resume=True, **options)
    assert [r["task_weights"] for r in resumed.history] == [r["task_weights"] for r in whole.history]
    for k, v in whole.attention.state_dict().items():
        assert torch.equal(resumed.attention.state_dict()[k], v), k
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert not {"task_attention", "attention_entropy", "attention_lr"} & set(FIRST_FIELDS)  # recorded when set


# Per-task BatchNorm statistics ---------------------------------------------------------------------------------------

TWO_TYPES = ["none", "noise(eps=0.5)"]  # clean digits vs. strong uniform noise: different feature statistics


def bn_stats(buffers):
    return {k: v.clone() for k, v in buffers.items() if "running" in k}


def test_each_attack_type_gets_its_own_statistics_and_training_is_unchanged():
    plain = tiny_run(TWO_TYPES, steps=20)
    result = tiny_run(TWO_TYPES, steps=20, task_bn=True)  # 20 updates per type: momentum 0.1 forgets the start
    for k, v in plain.model.state_dict().items():  # shared parameters and (meta) statistics: bit for bit
        assert torch.equal(result.model.state_dict()[k], v), k
    none, noise = (bn_stats(s) for s in result.task_bn.stats)
    assert result.task_bn.names == ["none", "noise"]
    assert all(not torch.allclose(none[k], noise[k], rtol=0.05) for k in none)  # the two types differ
    meta = bn_stats(result.model.state_dict())
    assert all(not torch.equal(none[k], meta[k]) for k in none)  # and differ from the meta statistics


def test_a_step_updates_only_the_sampled_types_statistics(erm_model):
    torch.manual_seed(0)
    model = copy.deepcopy(erm_model).train()
    params, buffers = state(model)
    shared = bn_stats(buffers)
    store = TaskBatchNorm(model, buffers, ["none", "noise"])
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 32)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=16, query_size=16)
    meta_batch_loss(model, params, buffers, [AttackTask(ma.attacks.make("none"), 0)], x, y,
                    dataclasses.replace(cfg, task_bn=True), options=[store])  # fmt: skip
    assert all(torch.equal(v, shared[k]) for k, v in bn_stats(store.stats[1]).items())  # not sampled: no leak
    assert all(not torch.equal(v, shared[k]) for k, v in bn_stats(store.stats[0]).items() if "mean" in k)
    # The inner loop never touches running statistics: the meta statistics move only by the query pass,
    # exactly as without task_bn.
    reference = copy.deepcopy(erm_model).train()
    r_params, r_buffers = state(reference)
    meta_batch_loss(reference, r_params, r_buffers, [AttackTask(ma.attacks.make("none"), 0)], x, y, cfg)
    assert all(torch.equal(buffers[k], r_buffers[k]) for k in buffers)


def test_a_resume_keeps_the_per_type_statistics(tmp_path):
    whole = tiny_run(TWO_TYPES, steps=4, task_bn=True)
    tiny_run(TWO_TYPES, tmp_path, steps=2, task_bn=True)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert saved["state"]["task_bn"]["names"] == ["none", "noise"]
    resumed = tiny_run(TWO_TYPES, tmp_path, steps=4, resume=True, task_bn=True)
    for mine, theirs in zip(resumed.task_bn.stats, whole.task_bn.stats, strict=True):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_evaluate_task_bn_picks_the_nearest_types_statistics():
    result = tiny_run(TWO_TYPES, steps=20, task_bn=True)
    _, test = ma.data.load("mnist5k")
    report = ma.evaluate(result.model, test, ["noise(eps=0.5)", "none"], n_examples=32, adapt_shots=16,
                         adapt_methods=("bn", "task_bn"), task_bn=result.task_bn)  # fmt: skip
    assert report.meta["task_bn_types"] == {ma.attacks.make("noise(eps=0.5)").spec: "noise", "none": "none"}
    assert set(report.adapted) == {"bn", "task_bn"} and 0 <= report.adapted_union["task_bn"] <= 1
    with pytest.raises(ValueError, match=r"task_bn=result\.task_bn"):
        ma.evaluate(result.model, test, "none", n_examples=8, adapt_shots=4, adapt_methods=("task_bn",))
