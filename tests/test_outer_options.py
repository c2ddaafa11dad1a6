"""Outer-loop options of ``MetaConfig`` inside ``meta_train`` (docs/meta_options.md): task attention.

The attention network itself is specified in tests/test_attention.py; here it is trained by meta_train.
"""

import copy
import json

import torch

import metaadv as ma
import metaadv.trainer as trainer
from metaadv import checkpoint as ckpt
from metaadv.attention import TaskAttention
from metaadv.models import SmallCNN


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
    assert "task_weights" not in plain.history[0] and plain.attention is None


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
    assert {"task_attention", "attention_entropy", "attention_lr"} <= set(trainer.LATER_FIELDS)
