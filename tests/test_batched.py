"""The task-batched meta-step (``MetaConfig(batched=True)``) equals the looped one.

Compared in float64 on a SmallCNN with BatchNorm in training mode, at 1e-10: vmap with native BatchNorm
gives second-order meta-gradients off by ~1e-4 relative, which a float32 test at 1e-3 would let through.
"""

import copy
import math

import pytest
import torch

import metaadv as ma
import metaadv.meta.craft as craft
from metaadv.attacks import make
from metaadv.attacks.spec import group_by_batch_key, run_grouped
from metaadv.functional import state
from metaadv.meta import TaskSets, craft_task_sets, meta_batch_loss, task_losses
from metaadv.meta.inner import adapt, adapt_tasks
from metaadv.meta.options.film import FiLM, TaskEncoding
from metaadv.meta.options.meta_dropout import MetaDropout, MetaDropoutOption
from metaadv.meta.options.step_bn import StepBatchNorm
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask, split_support_query

N_TASKS, SHOTS = 3, 6


def tiny_cnn(batch_norm: bool = True) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(batch_norm=batch_norm, image_size=8, hidden=16).double().train()


def tasks_of(*specs: str) -> list[AttackTask]:
    return [AttackTask(make(s), i) for i, s in enumerate(specs)]


def clean_batch(n_tasks: int = N_TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = n_tasks * 2 * SHOTS
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def fixed_sets(query: bool = True) -> list[TaskSets]:
    """Per-task sets of arbitrary images in [0, 1], standing in for crafted adversarial examples."""
    g = torch.Generator().manual_seed(2)

    def images() -> torch.Tensor:
        return torch.rand(SHOTS, 1, 8, 8, generator=g, dtype=torch.float64)

    def labels() -> torch.Tensor:
        return torch.randint(0, 10, (SHOTS,), generator=g)

    return [TaskSets(images(), labels(), images() if query else None, images(), labels()) for _ in range(N_TASKS)]


def config(batched: bool, **options) -> ma.MetaConfig:
    """Batched steps run vmapped (the GPU path, where vmap's pitfalls live) unless ``vmap_tasks`` says."""
    return ma.MetaConfig(**{"tasks_per_batch": N_TASKS, "support_size": SHOTS, "query_size": SHOTS,
                            "vmap_tasks": True, **options}, batched=batched)  # fmt: skip


def loss_stage(model, batched: bool, sets, tasks=None, **options):
    """Meta-gradient, per-task statistics and buffers after the loss stage on a copy of ``model``."""
    model = copy.deepcopy(model)
    params, buffers = state(model)
    tasks = tasks or tasks_of(*["fgsm(eps=0.1)"] * N_TASKS)
    loss, query_loss, query_acc = task_losses(model, params, buffers, tasks, sets, config(batched, **options))
    grads = torch.autograd.grad(loss.mean(), list(params.values()))
    return grads, (loss.detach(), query_loss, query_acc), buffers


def assert_all_close(actual, expected) -> None:
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batched_meta_gradient_equals_looped_on_a_batchnorm_model(first_order, inner_steps, clean_weight, vmap_tasks):
    """Vmapped (the GPU default) or task after task (the CPU default), the batched loss stage is the looped one."""
    model, sets = tiny_cnn(), fixed_sets()
    options = {"first_order": first_order, "inner_steps": inner_steps, "inner_lr": 0.1, "clean_weight": clean_weight,
               "vmap_tasks": vmap_tasks}  # fmt: skip
    looped = loss_stage(model, False, sets, **options)
    batched = loss_stage(model, True, sets, **options)
    assert_all_close(batched[0], looped[0])
    assert_all_close(batched[1], looped[1])


@pytest.mark.parametrize("steps", [0, 2])
def test_adapt_tasks_equals_adapt_per_task(steps):
    model, sets = tiny_cnn(), fixed_sets()
    support, support_y = torch.stack([s.support for s in sets]), torch.stack([s.support_y for s in sets])
    batched = adapt_tasks(model, support, support_y, steps=steps, lr=0.1)
    for t, s in enumerate(sets):
        looped = adapt(model, s.support, s.support_y, steps=steps, lr=0.1)
        assert_all_close([v[t] for v in batched.values()], list(looped.values()))


@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batched_query_attack_against_the_adapted_copies_equals_looped(vmap_tasks):
    model, sets = tiny_cnn(), fixed_sets(query=False)
    tasks = tasks_of("fgsm(eps=0.1)", "pgd_linf(eps=0.2, steps=2, random_start=False)", "fgsm(eps=0.3)")
    looped = loss_stage(model, False, sets, tasks, query_attack="adapted", inner_lr=0.1)
    batched = loss_stage(model, True, sets, tasks, query_attack="adapted", inner_lr=0.1, vmap_tasks=vmap_tasks)
    assert_all_close(batched[0], looped[0])
    assert_all_close(batched[1], looped[1])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batchnorm_running_statistics_after_batched_meta_steps_equal_looped(momentum, vmap_tasks):
    """Two meta-steps of 3 tasks: each query forward pass moves the statistics once per task, in task order
    (with momentum None, BatchNorm's cumulative average, the count so far matters)."""
    model = tiny_cnn()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    x, y = clean_batch()
    tasks = tasks_of(*["none"] * N_TASKS)  # the same support/query sets in both modes
    after = {}
    for batched in (False, True):
        copy_ = copy.deepcopy(model)
        params, buffers = state(copy_)
        for _ in range(2):
            meta_batch_loss(copy_, params, buffers, tasks, x, y, config(batched, vmap_tasks=vmap_tasks))
        after[batched] = buffers
    assert int(after[True]["features.1.num_batches_tracked"]) == 2 * N_TASKS
    assert_all_close(list(after[True].values()), list(after[False].values()))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batched_crafting_equals_per_task_crafting_without_random_starts(training, vmap_tasks):
    """Without random starts the attacks are deterministic, and each task's examples are normalized with their
    own BatchNorm statistics in training mode (as in a call per task): one call per attack family then equals
    one call per task."""
    model = tiny_cnn().train(training)
    params, buffers = state(model)
    x, y = clean_batch(5)
    tasks = tasks_of(
        "pgd_linf(eps=0.1, steps=2, random_start=False)",
        "fgsm(eps=0.2)",
        "pgd_linf(eps=0.3, steps=2, random_start=False)",
        "pgd_l2(eps=1.0, steps=2, random_start=False)",
        "fgsm(eps=0.05)",
    )
    for query_attack in ("meta", "adapted"):
        looped = craft_task_sets(model, params, buffers, tasks, x, y, config(False, query_attack=query_attack))
        batched = craft_task_sets(model, params, buffers, tasks, x, y,
                                  config(True, query_attack=query_attack, vmap_tasks=vmap_tasks))  # fmt: skip
        for a, b in zip(batched, looped, strict=True):
            torch.testing.assert_close(a.support, b.support, rtol=1e-10, atol=1e-12)
            assert (a.query is None) == (b.query is None) == (query_attack == "adapted")
            if a.query is not None:
                torch.testing.assert_close(a.query, b.query, rtol=1e-10, atol=1e-12)


def test_mixed_tasks_run_one_attack_call_per_family_and_each_task_keeps_its_eps(monkeypatch):
    specs = [
        "pgd_linf(eps=0.1, steps=2)",
        "fgsm(eps=0.3)",
        "pgd_linf(eps=0.2, steps=2)",
        "pgd_linf(eps=0.2, steps=3)",  # other steps: another family
        "msd(steps=2)",  # no per-example eps: alone
        "torchattacks:FGSM(eps=0.25)",  # alone
    ]
    tasks = tasks_of(*specs)
    assert group_by_batch_key([t.attack for t in tasks]) == [[0, 2], [1], [3], [4], [5]]
    canonical, calls = [t.attack.spec for t in tasks], []

    def counting(attacks, *args):
        calls.append([canonical.index(a.spec) for a in attacks])
        return original(attacks, *args)

    original = craft.run_grouped
    monkeypatch.setattr(craft, "run_grouped", counting)
    model = tiny_cnn()
    params, buffers = state(model)
    x, y = clean_batch(len(tasks))
    out = meta_batch_loss(model, params, buffers, tasks, x, y, config(True, tasks_per_batch=len(tasks)))
    assert calls == [[0, 2], [1], [3], [4], [5]]  # one attack call per family
    assert torch.isfinite(out.loss) and out.query_acc.shape == (len(tasks),)
    sets = craft_task_sets(model, params, buffers, tasks, x, y, config(True, tasks_per_batch=len(tasks)))
    chunks = split_support_query(x, y, len(tasks), SHOTS, SHOTS)
    for task, s, (xs, _, xq, _) in zip(tasks, sets, chunks, strict=True):
        if task.attack.norm == "linf":  # each task's examples lie in its own ball, not in its group's largest
            assert float((s.support - xs).abs().max()) <= task.attack.eps + 1e-12
            assert float((s.query - xq).abs().max()) <= task.attack.eps + 1e-12


def test_batch_key_ignores_eps_only():
    assert make("pgd_linf(eps=0.1)").batch_key == make("pgd_linf(eps=0.3)").batch_key
    assert make("pgd_linf(eps=0.1)").batch_key != make("pgd_linf(eps=0.1, steps=3)").batch_key
    assert make("pgd_linf(eps=0.1)").batch_key != make("pgd_l2(eps=0.1)").batch_key
    assert make("cw_l2(eps=1.0)").batch_key == make("cw_l2(eps=2.0)").batch_key
    for spec in ("none", "msd", "torchattacks:PGD(eps=0.3)", "cw_l2"):  # no per-example eps, or none set
        assert make(spec).batch_key is None
    x, y = clean_batch(1)
    with pytest.raises(ValueError, match="more than eps"):
        run_grouped([make("fgsm(eps=0.1)"), make("pgd_linf(eps=0.1)")], tiny_cnn(), [x, x], [y, y])


def test_a_model_without_batchnorm_runs_batched():
    model, sets = tiny_cnn(batch_norm=False), fixed_sets()
    assert not dict(model.named_buffers())
    looped = loss_stage(model, False, sets, inner_steps=2, inner_lr=0.1)
    batched = loss_stage(model, True, sets, inner_steps=2, inner_lr=0.1)
    assert_all_close(batched[0], looped[0])


def test_batched_must_be_a_bool_and_vmap_tasks_a_bool_or_none():
    with pytest.raises(ValueError, match=r"MetaConfig\.batched"):
        ma.MetaConfig(batched="yes")
    with pytest.raises(ValueError, match=r"MetaConfig\.vmap_tasks"):
        ma.MetaConfig(vmap_tasks="auto")
    assert ma.MetaConfig().batched and ma.MetaConfig().vmap_tasks is None  # the defaults: batched, vmap on CUDA


def test_meta_train_batched_end_to_end(mnist5k):
    train, _ = mnist5k
    dist = ma.AttackDistribution(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], eps_ranges=[(0.1, 0.3), None])
    cfg = ma.MetaConfig(tasks_per_batch=3, sample_replace=True, support_size=8, query_size=8, steps=3, batched=True)
    result = ma.meta_train(SmallCNN(hidden=64), train, dist, cfg, progress=False)
    assert len(result.history) == 3
    assert all(math.isfinite(r["loss"]) and len(r["query_acc"]) == 3 for r in result.history)


@pytest.mark.gpu
def test_batched_meta_step_reads_nothing_back_from_the_gpu():
    model = SmallCNN(hidden=64).cuda().train()
    params, buffers = state(model)
    x, y = torch.rand(4 * 16, 1, 28, 28, device="cuda"), torch.randint(0, 10, (4 * 16,), device="cuda")
    tasks = tasks_of("pgd_linf(eps=0.1, steps=2)", "pgd_linf(eps=0.3, steps=2)", "fgsm(eps=0.2)", "fgsm(eps=0.3)")
    cfg = ma.MetaConfig(tasks_per_batch=4, support_size=8, query_size=8, batched=True)
    meta_batch_loss(model, params, buffers, tasks, x, y, cfg).loss.backward()  # warm-up (lazy initialization)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta_batch_loss(model, params, buffers, tasks, x, y, cfg).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batched_per_step_batchnorm_equals_looped(vmap_tasks):
    """Per-step statistics (MAML++): each inner step's support pass moves its set once per task, in task order,
    and the query pass the last set, in both modes; the meta-gradient is the same."""
    model, sets, after = tiny_cnn(), fixed_sets(), {}
    for batched in (False, True):
        copy_ = copy.deepcopy(model)
        params, buffers = state(copy_)
        step_bn = StepBatchNorm(copy_, buffers, 2)
        cfg = config(batched, per_step_bn=True, inner_steps=2, inner_lr=0.1, vmap_tasks=vmap_tasks)
        loss, _, _ = task_losses(copy_, params, buffers, tasks_of(*["fgsm(eps=0.1)"] * N_TASKS), sets, cfg,
                                 options=[step_bn])  # fmt: skip
        grads = torch.autograd.grad(loss.mean(), list(params.values()))
        after[batched] = (grads, loss.detach(), [list(s.values()) for s in step_bn.sets(buffers)])
    assert_all_close(after[True][0], after[False][0])
    assert_all_close(after[True][1], after[False][1])
    for k, (a, b) in enumerate(zip(after[True][2], after[False][2], strict=True)):
        assert int(a[2]) == int(b[2]) == N_TASKS, k  # num_batches_tracked of the first BatchNorm layer
        assert_all_close(a, b)


def test_batched_meta_dropout_draws_each_task_its_own_masks_and_trains_the_keep_logits():
    torch.manual_seed(0)
    model = MetaDropout(SmallCNN(image_size=8, hidden=16).double(), p=0.2).train()
    params, buffers = state(model)
    tasks = tasks_of(*["fgsm(eps=0.1)"] * N_TASKS)
    same = [fixed_sets()[0]] * N_TASKS  # identical tasks: only the dropout masks tell them apart
    loss, _, _ = task_losses(model, params, buffers, tasks, same, config(True, meta_dropout=0.2, inner_lr=0.1),
                             options=[MetaDropoutOption()])  # fmt: skip
    assert len(set(loss.tolist())) == N_TASKS
    grads = torch.autograd.grad(loss.mean(), [params["keep_logits.0"], params["keep_logits.1"]])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("encoding", ["type", "support"])
@pytest.mark.parametrize("query_attack", ["meta", "adapted"])
@pytest.mark.parametrize("vmap_tasks", [True, False])
def test_batched_task_encoding_equals_looped(encoding, query_attack, vmap_tasks):
    """FiLM task codes, one per task (the type's embedding, or the support set's encoding), in the inner loop,
    the query pass and the attacks against the adapted copies: on the same crafted sets, the meta-gradient
    (embedding or encoder included), the query statistics and the running statistics agree. With type codes the
    attacks against the meta-parameters target each task's code, so batched crafting equals looped crafting
    too (each task's examples then get their own BatchNorm statistics)."""
    torch.manual_seed(0)
    model = FiLM(SmallCNN(image_size=8, hidden=16), n_types=3, dim=4, encoding=encoding).double().train()
    x, y = clean_batch()
    tasks = tasks_of("fgsm(eps=0.1)", "pgd_linf(eps=0.2, steps=2, random_start=False)", "fgsm(eps=0.3)")
    found, crafted = {}, {}
    for batched in (False, True):
        copy_ = copy.deepcopy(model)
        params, buffers = state(copy_)
        cfg = config(batched, task_encoding=encoding, encoding_dim=4, inner_lr=0.1, query_attack=query_attack,
                     vmap_tasks=vmap_tasks)  # fmt: skip
        options = [TaskEncoding(encoding)]
        crafted[batched] = craft_task_sets(copy_, params, buffers, tasks, x, y, cfg, options=options)
        loss, query_loss, query_acc = task_losses(copy_, params, buffers, tasks, crafted[False], cfg, options=options)
        grads = torch.autograd.grad(loss.mean(), list(params.values()))
        found[batched] = (grads, (query_loss, query_acc), list(buffers.values()))
    for a, b in zip(found[True], found[False], strict=True):
        assert_all_close(a, b)
    if encoding == "type":
        for a, b in zip(crafted[True], crafted[False], strict=True):
            assert_all_close([a.support] + ([a.query] if a.query is not None else []),
                             [b.support] + ([b.query] if b.query is not None else []))  # fmt: skip
