"""The adaptation gap (``MetaConfig.log_adaptation_gap``): the adapted copies' query accuracy minus the
meta-parameters' on the same query examples, logged per task and step, training unchanged."""

import pytest
import torch

import metaadv as ma
from metaadv.models import SmallCNN

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"]


def tiny_run(**options):
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 96)
    torch.manual_seed(0)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=3, device="cpu", **options)
    return ma.meta_train(SmallCNN(hidden=16), (x, y), ma.AttackDistribution(SPECS, seed=0), cfg, progress=False)


@pytest.mark.parametrize("batched", [True, False])
def test_an_inner_loop_that_changes_nothing_shows_a_gap_of_zero(batched):
    run = tiny_run(log_adaptation_gap=True, inner_steps=0, batched=batched)
    for r in run.history:
        assert r["query_acc_theta"] == r["query_acc"] and r["adaptation_gap"] == [0.0, 0.0]


def test_the_gap_is_the_adapted_accuracy_minus_the_accuracy_at_theta_and_training_is_unchanged():
    on, off = tiny_run(log_adaptation_gap=True, inner_lr=0.5), tiny_run(inner_lr=0.5)
    for r in on.history:
        assert len(r["adaptation_gap"]) == 2
        expected = [a - b for a, b in zip(r["query_acc"], r["query_acc_theta"], strict=True)]
        assert r["adaptation_gap"] == pytest.approx(expected)
    assert any(g != 0 for r in on.history for g in r["adaptation_gap"])  # a large inner step moves the model
    assert [r["loss"] for r in on.history] == [r["loss"] for r in off.history]
    for k, v in off.model.state_dict().items():
        assert torch.equal(on.model.state_dict()[k], v), k


def test_the_gap_needs_query_examples_crafted_against_the_meta_parameters():
    with pytest.raises(ValueError, match="query_attack='meta'"):
        tiny_run(log_adaptation_gap=True, query_attack="adapted")
