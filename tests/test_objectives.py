"""Adaptation-aware meta-objectives: the zero-shot term (``zero_shot_weight``), worst-case aggregation over
the tasks (``task_aggregation``) and the cross-attack consistency term (``consistency_weight``)."""

import pytest
import torch
import torch.nn.functional as F

import metaadv as ma
from metaadv.attacks import make
from metaadv.functional import call, clone_buffers, state
from metaadv.meta import meta_batch_loss
from metaadv.meta.options.consistency import ConsistencyTerm, symmetric_kl
from metaadv.meta.options.worst_case import WorstCase
from metaadv.meta.options.zero_shot import ZeroShotTerm
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2, random_start=False)", "fgsm(eps=0.1)"]


def setting(**options):
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, hidden=16).double().train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3 * 12, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (36,), generator=g)
    cfg = ma.MetaConfig(tasks_per_batch=3, support_size=6, query_size=6, inner_lr=0.1, **options)
    return model, x, y, cfg, [AttackTask(make(s), i) for i, s in enumerate(SPECS)]


TERMS = [  # (MetaConfig field, option, its logged loss, lambda, whether every parameter gets a gradient)
    ("zero_shot_weight", ZeroShotTerm, "zero_shot_loss", 0.5, True),
    ("consistency_weight", ConsistencyTerm, "consistency_loss", 2.0, False),
]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(("field", "option", "logged", "weight", "every_grad"), TERMS)
def test_an_added_term_adds_lambda_times_its_loss_and_leaves_the_meta_loss_as_it_was(
    batched, field, option, logged, weight, every_grad
):
    model, x, y, cfg, tasks = setting(**{field: weight}, batched=batched)
    params, buffers = state(model)
    out = meta_batch_loss(model, params, buffers, tasks, x, y, cfg, options=[option(weight)])
    plain_model, _, _, plain_cfg, _ = setting(batched=batched)
    plain_params, plain_buffers = state(plain_model)
    plain = meta_batch_loss(plain_model, plain_params, plain_buffers, tasks, x, y, plain_cfg)
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-12, atol=0)  # the adapted copies' meta-loss
    torch.testing.assert_close(out.objective, weight * out.logged[logged], rtol=1e-12, atol=0)
    grads = [g.abs().sum() for g in torch.autograd.grad(out.objective, list(params.values()))]
    assert all(torch.isfinite(g) for g in grads) and (all if every_grad else any)(g > 0 for g in grads)
    with pytest.raises(ValueError, match=field):
        ma.MetaConfig(**{field: -0.1})


def test_the_zero_shot_loss_is_that_of_the_crafted_support_sets():
    model, x, y, cfg, tasks = setting(zero_shot_weight=2.0)
    params, buffers = state(model)
    sets = ma.meta.craft_task_sets(model, params, buffers, tasks, x, y, cfg)
    found = ZeroShotTerm(2.0).aggregate(model, params, buffers, tasks, sets, None, None, None)
    by_hand = torch.stack([F.cross_entropy(call(model, params, clone_buffers(buffers), s.support), s.support_y)
                           for s in sets]).mean()  # fmt: skip
    torch.testing.assert_close(found.logged["zero_shot_loss"], by_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(found.objective, 2.0 * by_hand, rtol=1e-10, atol=1e-12)


def test_max_aggregation_trains_on_the_worst_task_and_softmax_interpolates():
    model, x, y, cfg, tasks = setting(task_aggregation="max")
    params, buffers = state(model)
    out = meta_batch_loss(model, params, buffers, tasks, x, y, cfg, options=[WorstCase("max")])
    worst = out.query_loss.argmax()
    assert out.task_weights.tolist() == F.one_hot(worst, 3).double().tolist()
    torch.testing.assert_close(out.loss, out.query_loss[worst], rtol=1e-12, atol=0)  # clean_weight 0: L_i
    warm = WorstCase("softmax", temperature=1e6).aggregate(model, params, buffers, tasks, [], out.query_loss,
                                                          out.query_loss, out.query_acc)  # fmt: skip
    torch.testing.assert_close(warm.weights, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=1e-5, atol=0)


def test_meta_train_logs_every_term_and_refuses_worst_case_with_attention():
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 64)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=2, device="cpu",
                        zero_shot_weight=0.3, task_aggregation="softmax", aggregation_temperature=0.5,
                        consistency_weight=0.2)  # fmt: skip
    run = ma.meta_train(SmallCNN(hidden=16), (x, y), ma.AttackDistribution(SPECS[:2], seed=0), cfg, progress=False)
    assert all(r["zero_shot_loss"] > 0 and len(r["task_weights"]) == 2 for r in run.history)
    assert all(r["consistency_loss"] >= 0 and not r["skipped"] for r in run.history)
    with pytest.raises(ValueError, match="task_attention"):
        ma.meta_train(SmallCNN(hidden=16), (x, y), ma.AttackDistribution(SPECS[:2], seed=0),
                      ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=1, task_attention=True,
                                    task_aggregation="max"), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="zero_shot_weight"):
        ma.MetaConfig(zero_shot_weight=-1.0)


def test_the_symmetric_kl_is_zero_for_equal_predictions_symmetric_and_the_mean_of_both_kls():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, 10, generator=g, dtype=torch.float64)
    kl = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="batchmean")  # KL(p||q)
    back = F.kl_div(F.log_softmax(p, -1), F.log_softmax(q, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(symmetric_kl(p, q), (kl + back) / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(symmetric_kl(q, p), symmetric_kl(p, q), rtol=1e-12, atol=0)
    assert symmetric_kl(p, p) == 0 and symmetric_kl(p, p + 3.0) < 1e-15  # the same softmax


def test_the_consistency_term_pairs_theta_on_every_tasks_attack_of_the_first_tasks_query_examples():
    model, x, y, cfg, tasks = setting(consistency_weight=0.5)
    params, buffers = state(model)
    sets = ma.meta.craft_task_sets(model, params, buffers, tasks, x, y, cfg)
    found = ConsistencyTerm(0.5).aggregate(model, params, buffers, tasks, sets, None, None, None)

    def theta(z):  # training-mode BatchNorm on the version's own statistics, nothing moved
        return call(model, {k: v.detach() for k, v in params.items()}, clone_buffers(buffers), z)

    clean, labels = sets[0].query_clean, sets[0].query_y
    logits = [call(model, params, clone_buffers(buffers), task(theta, clean, labels)) for task in tasks]
    by_hand = torch.stack([symmetric_kl(logits[i], logits[j]) for i, j in ((0, 1), (0, 2), (1, 2))]).mean()
    torch.testing.assert_close(found.logged["consistency_loss"], by_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(found.objective, 0.5 * by_hand, rtol=1e-10, atol=1e-12)
    assert by_hand > 0
    same_type = [AttackTask(make(SPECS[0]), 0)] * 3  # no pair of different attack types: no term
    assert ConsistencyTerm(0.5).aggregate(model, params, buffers, same_type, sets, None, None, None).objective == 0
