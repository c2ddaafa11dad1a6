"""Inner-loop options of ``MetaConfig`` (docs/meta_options.md): ANIL's head-only inner loop, the proximal term,
first-order -> second-order annealing and Meta-SGD's learned step sizes, each checked against a reference.

Float64 throughout; looped and task-batched inner loops are compared at 1e-10 as in tests/test_batched.py.
"""

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.attacks import make
from metaadv.functional import call, clone_buffers, state
from metaadv.meta import TaskSets, meta_batch_loss, task_losses
from metaadv.meta.inner import adapt, adapt_tasks, init_inner_lr, inner_parameter_names
from metaadv.meta.options import Aggregate, MetaOption
from metaadv.meta.options.meta_sgd import MetaSGD
from metaadv.meta.train import FIRST_FIELDS
from metaadv.models import PreActResNet18, SmallCNN
from metaadv.tasks import AttackTask

N_TASKS, SHOTS, LR = 3, 6, 0.1
HEAD = ("head.3.weight", "head.3.bias")  # SmallCNN's last Linear


def tiny_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(image_size=8, hidden=16).double().train()


def fixed_sets() -> list[TaskSets]:
    """Per-task sets of arbitrary images in [0, 1], standing in for crafted adversarial examples."""
    g = torch.Generator().manual_seed(2)

    def images() -> torch.Tensor:
        return torch.rand(SHOTS, 1, 8, 8, generator=g, dtype=torch.float64)

    def labels() -> torch.Tensor:
        return torch.randint(0, 10, (SHOTS,), generator=g)

    return [TaskSets(images(), labels(), images(), images(), labels()) for _ in range(N_TASKS)]


def config(**options) -> ma.MetaConfig:
    """The looped reference step unless ``batched=True`` (then vmapped: the GPU path)."""
    base = {"tasks_per_batch": N_TASKS, "support_size": SHOTS, "query_size": SHOTS, "inner_lr": LR, "batched": False,
            "vmap_tasks": True}  # fmt: skip
    return ma.MetaConfig(**{**base, **options})


def meta_grads(model, step=None, inner_lr=None, **options):
    """Meta-gradient (w.r.t. the parameters, then ``inner_lr``) of the loss stage on a copy of ``model``."""
    model = copy.deepcopy(model)
    params, buffers = state(model)
    tasks = [AttackTask(make("fgsm(eps=0.1)"), i) for i in range(N_TASKS)]
    given = [MetaSGD(inner_lr)] if inner_lr is not None else []
    loss, _, _ = task_losses(model, params, buffers, tasks, fixed_sets(), config(**options), step=step,
                             options=given)  # fmt: skip
    leaves = [*params.values(), *(inner_lr or {}).values()]
    return torch.autograd.grad(loss.mean(), leaves)


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-13) -> None:
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def support_query():
    s = fixed_sets()[0]
    return s.support, s.support_y, s.query, s.query_y


# ANIL: only the head adapts ------------------------------------------------------------------------------------


def test_head_is_the_last_module_with_parameters_of_its_own():
    assert inner_parameter_names(tiny_cnn(), "head") == list(HEAD)
    assert inner_parameter_names(PreActResNet18(), "head") == ["linear.weight", "linear.bias"]
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert inner_parameter_names(seq, "head") == ["2.weight", "2.bias"]
    assert inner_parameter_names(seq, "all") == [k for k, _ in seq.named_parameters()]
    with pytest.raises(ValueError, match="inner_params"):
        inner_parameter_names(seq, "tail")


@pytest.mark.parametrize("first_order", [False, True])
def test_head_only_adapts_the_head_and_the_meta_gradient_reaches_the_features(first_order):
    model = tiny_cnn()
    xs, ys, xq, yq = support_query()
    params, buffers = state(model)
    adapted = adapt(model, xs, ys, steps=2, lr=LR, inner_params="head", first_order=first_order)
    for k, p in params.items():
        assert torch.equal(adapted[k], p) != (k in HEAD), k
    query = F.cross_entropy(call(model, adapted, clone_buffers(buffers), xq), yq)
    grads = dict(zip(params, torch.autograd.grad(query, list(params.values())), strict=True))
    assert float(grads["features.0.weight"].abs().max()) > 1e-6


def test_head_meta_gradient_equals_a_hand_unrolled_anil():
    model = tiny_cnn()
    xs, ys, xq, yq = support_query()
    params, buffers = state(model)
    adapted = adapt(model, xs, ys, steps=2, lr=LR, inner_params="head")
    query = F.cross_entropy(call(model, adapted, clone_buffers(buffers), xq), yq)
    ours = torch.autograd.grad(query, list(params.values()))

    scratch, fast = clone_buffers(buffers), {k: params[k] for k in HEAD}
    for _ in range(2):
        loss = F.cross_entropy(functional_call(model, {**params, **fast, **scratch}, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: p - LR * g for (k, p), g in zip(fast.items(), grads, strict=True)}
    query = F.cross_entropy(functional_call(model, {**params, **fast, **scratch}, (xq,)), yq)
    assert_all_close(ours, torch.autograd.grad(query, list(params.values())))


@pytest.mark.parametrize("first_order", [False, True])
def test_head_batched_equals_looped(first_order):
    model = tiny_cnn()
    options = {"inner_params": "head", "inner_steps": 2, "first_order": first_order}
    looped = meta_grads(model, **options)
    assert_all_close(meta_grads(model, batched=True, **options), looped)
    assert not all(torch.equal(a, b) for a, b in zip(looped, meta_grads(model, inner_steps=2), strict=True))


# BN-only inner loop: only the BatchNorm layers' scale and shift adapt ----------------------------------------------

BN = ("features.1.weight", "features.1.bias", "features.5.weight", "features.5.bias")  # SmallCNN's two BatchNorms


@pytest.mark.parametrize("first_order", [False, True])
def test_bn_only_adapts_the_batchnorm_affine_parameters_and_batched_equals_looped(first_order):
    model = tiny_cnn()
    assert inner_parameter_names(model, "bn") == list(BN)
    xs, ys, _, _ = support_query()
    params, _ = state(model)
    adapted = adapt(model, xs, ys, steps=2, lr=LR, inner_params="bn", first_order=first_order)
    for k, p in params.items():
        assert torch.equal(adapted[k], p) != (k in BN), k
    options = {"inner_params": "bn", "inner_steps": 2, "first_order": first_order}
    assert_all_close(meta_grads(model, batched=True, **options), meta_grads(model, **options))
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        inner_parameter_names(nn.Sequential(nn.Linear(3, 2)), "bn")


# Proximal term ---------------------------------------------------------------------------------------------------


def test_proximal_keeps_the_adapted_copy_closer_to_the_start():
    model = tiny_cnn()
    xs, ys, _, _ = support_query()
    params, _ = state(model)

    def distance(proximal: float) -> float:
        adapted = adapt(model, xs, ys, steps=3, lr=LR, proximal=proximal)
        return sum(float((adapted[k] - p).detach().pow(2).sum()) for k, p in params.items()) ** 0.5

    free, held = distance(0.0), distance(2.0)
    assert 0 < held < 0.9 * free


def test_proximal_update_and_meta_gradient_equal_the_hand_computed_ones_on_a_linear_model():
    """f(x) = x W^T, support loss 0.5 ||X W^T - T||^2, so one step is W - lr (R^T X + 2 lambda (W - W0))."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    xq, tq = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    lam, lr, steps = 0.7, 0.05, 3

    def mse(out, target):
        return 0.5 * (out - target).pow(2).sum()

    w0 = model.weight
    adapted = adapt(model, x, t, steps=steps, lr=lr, loss_fn=mse, proximal=lam)["weight"]
    w = w0.detach().clone()
    for _ in range(steps):
        w = w - lr * ((x @ w.T - t).T @ x + 2 * lam * (w - w0.detach()))
    torch.testing.assert_close(adapted.detach(), w, rtol=1e-12, atol=1e-14)
    unchanged = adapt(model, x, t, steps=1, lr=lr, loss_fn=mse)["weight"]  # one step from theta: no pull yet
    torch.testing.assert_close(adapt(model, x, t, steps=1, lr=lr, loss_fn=mse, proximal=lam)["weight"], unchanged)

    ours = torch.autograd.grad(mse(xq @ adapted.T, tq), w0)[0]
    fast = w0  # reference: the proximal term in the loss, theta kept in the graph
    for _ in range(steps):
        loss = mse(x @ fast.T, t) + lam * (fast - w0).pow(2).sum()
        fast = fast - lr * torch.autograd.grad(loss, fast, create_graph=True)[0]
    torch.testing.assert_close(ours, torch.autograd.grad(mse(xq @ fast.T, tq), w0)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner_params", ["all", "head"])
def test_proximal_batched_equals_looped_and_changes_the_meta_gradient(inner_params):
    model = tiny_cnn()
    options = {"inner_steps": 3, "proximal": 0.5, "inner_params": inner_params}
    looped = meta_grads(model, **options)
    assert_all_close(meta_grads(model, batched=True, **options), looped)
    plain = meta_grads(model, inner_steps=3, inner_params=inner_params)
    assert max(float((a - b).abs().max()) for a, b in zip(looped, plain, strict=True)) > 1e-8


# First-order -> second-order annealing ----------------------------------------------------------------------------


def test_first_order_at_follows_the_schedule():
    c = ma.MetaConfig(first_order_until=3)
    assert [c.first_order_at(i) for i in range(5)] == [True, True, True, False, False]
    assert all(ma.MetaConfig(first_order=True, first_order_until=3).first_order_at(i) for i in range(5))
    assert not ma.MetaConfig().first_order_at(None) and ma.MetaConfig(first_order=True).first_order_at(None)
    with pytest.raises(ValueError, match="first_order_until"):
        c.first_order_at(None)


@pytest.mark.parametrize("batched", [False, True])
def test_annealed_meta_gradient_is_first_order_before_the_switch_and_second_order_after(batched):
    model = tiny_cnn()
    first = meta_grads(model, first_order=True, inner_steps=2, batched=batched)
    second = meta_grads(model, first_order=False, inner_steps=2, batched=batched)
    assert max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True)) > 1e-6
    for step, expected in ((0, first), (1, first), (2, second), (7, second)):
        assert_all_close(meta_grads(model, step, first_order_until=2, inner_steps=2, batched=batched), expected)
    stays_first = meta_grads(model, 7, first_order=True, first_order_until=2, inner_steps=2, batched=batched)
    assert_all_close(stays_first, first)


def tiny_run(tmp_path=None, steps=4, resume=False, **options):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    tasks = ma.AttackDistribution(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return ma.meta_train(model, (x, y), tasks, cfg, progress=False, **where)


def test_the_first_order_schedule_counts_meta_steps_across_a_resume(tmp_path, caplog):
    whole = tiny_run(steps=4, first_order_until=3)
    tiny_run(tmp_path, steps=2, first_order_until=3)
    with caplog.at_level(logging.INFO, logger="metaadv.meta.train"):
        resumed = tiny_run(tmp_path, steps=4, resume=True, first_order_until=3)
    assert [r.getMessage() for r in caplog.records if "switching" in r.getMessage()] == [
        "meta-step 4: switching from first-order to second-order meta-gradients"
    ]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


# Meta-SGD: learned per-parameter step sizes -------------------------------------------------------------------------


def test_constant_step_size_tensors_equal_the_scalar_step_and_receive_a_gradient():
    model = tiny_cnn()
    xs, ys, xq, yq = support_query()
    lrs = init_inner_lr(model, LR, "head")
    assert list(lrs) == list(HEAD) and all(v.is_leaf and v.requires_grad for v in lrs.values())
    assert all(torch.equal(v, torch.full_like(model.get_parameter(k), LR)) for k, v in lrs.items())
    adapted = adapt(model, xs, ys, steps=2, lr=lrs, inner_params="head")
    reference = adapt(model, xs, ys, steps=2, lr=LR, inner_params="head")
    assert_all_close(list(adapted.values()), list(reference.values()))
    query = F.cross_entropy(call(model, adapted, clone_buffers(dict(model.named_buffers())), xq), yq)
    assert all(float(g.abs().max()) > 0 for g in torch.autograd.grad(query, list(lrs.values())))
    with pytest.raises(ValueError, match="one tensor per adapted parameter"):
        adapt(model, xs, ys, lr=lrs)  # "all" adapts more than the head


def test_learned_step_sizes_batched_equal_looped():
    model = tiny_cnn()
    lrs = init_inner_lr(model, LR)
    with torch.no_grad():  # step sizes that differ between entries
        for v in lrs.values():
            v.mul_(torch.rand_like(v) + 0.5)
    looped = meta_grads(model, inner_lr=lrs, inner_steps=2, learn_inner_lr=True)
    assert_all_close(meta_grads(model, inner_lr=lrs, inner_steps=2, learn_inner_lr=True, batched=True), looped)
    with pytest.raises(ValueError, match="learn_inner_lr"):
        meta_grads(model, learn_inner_lr=True)


def test_meta_train_learns_the_step_sizes_and_a_resume_keeps_them(tmp_path):
    whole = tiny_run(learn_inner_lr=True, inner_params="head")
    assert set(whole.inner_lr) == {"head.3.weight", "head.3.bias"}
    assert all(not torch.allclose(v, torch.full_like(v, 0.05)) for v in whole.inner_lr.values())

    tiny_run(tmp_path, steps=2, learn_inner_lr=True, inner_params="head")
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert set(saved["state"]["inner_lr"]) == set(whole.inner_lr)
    resumed = tiny_run(tmp_path, steps=4, resume=True, learn_inner_lr=True, inner_params="head")
    for k, v in whole.inner_lr.items():
        assert torch.equal(resumed.inner_lr[k], v), k
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_defaults_add_nothing_to_results_or_checkpoints(tmp_path):
    result = tiny_run(tmp_path, steps=1)
    assert result.artifacts == {}
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert set(saved["state"]) == {"model", "optimizer", "task_rng", "tasks"}
    assert set(json.loads(saved["config"])["meta"]) <= set(FIRST_FIELDS)  # so older checkpoints resume


# Validation --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inner_params", "tail"),
        ("proximal", -1),
        ("proximal", float("nan")),
        ("first_order_until", -1),
        ("first_order_until", 1.5),
        ("learn_inner_lr", "yes"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MetaConfig.{field}"):
        ma.MetaConfig(**{field: value})


def test_adapt_rejects_bad_options():
    model = tiny_cnn()
    xs, ys, _, _ = support_query()
    with pytest.raises(ValueError, match="proximal"):
        adapt(model, xs, ys, proximal=-0.1)
    with pytest.raises(ValueError, match="inner_params"):
        adapt_tasks(model, xs[None], ys[None], inner_params="tail")
    with pytest.raises(ValueError, match="shape"):
        adapt(model, xs, ys, lr={k: torch.ones(2) for k in HEAD}, inner_params="head")


def test_options_round_trip_through_the_yaml_meta_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "tasks:\n  specs: [fgsm(eps=0.3)]\nmeta:\n  inner_params: head\n  proximal: 0.1\n"
        "  first_order_until: 50\n  learn_inner_lr: true\n"
    )
    meta = ma.load_run_config(path).meta
    assert (meta.inner_params, meta.proximal, meta.first_order_until, meta.learn_inner_lr) == ("head", 0.1, 50, True)


def test_the_architecture_docs_option_example_acts_through_its_hook_alone():
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    example = re.search(r"### Adding a meta option.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace = {"torch": torch, "MetaOption": MetaOption, "Aggregate": Aggregate}
    exec(compile(example, "docs/architecture.md", "exec"), namespace)
    model = tiny_cnn()
    params, buffers = state(model)
    tasks = [AttackTask(make("fgsm(eps=0.1)"), i) for i in range(N_TASKS)]
    x = torch.cat([torch.cat([s.support, s.query]) for s in fixed_sets()])
    y = torch.cat([torch.cat([s.support_y, s.query_y]) for s in fixed_sets()])
    plain = meta_batch_loss(copy.deepcopy(model), params, buffers, tasks, x, y, config(inner_steps=0))
    out = meta_batch_loss(model, params, buffers, tasks, x, y, config(inner_steps=0),
                          options=[namespace["LossSpread"](0.5)])  # fmt: skip
    assert torch.allclose(out.loss, plain.loss, rtol=0, atol=1e-12)  # uniform weights: the plain mean
    assert torch.allclose(out.objective, 0.5 * out.logged["loss_spread"])
