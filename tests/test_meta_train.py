"""meta_train end to end on the embedded data, its history, determinism and input checks."""

import pytest
import torch

import metaadv as ma
from metaadv.attacks import make
from metaadv.baselines import adversarial_train
from metaadv.models import SmallCNN

TASKS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=5)"]


@pytest.fixture(scope="module")
def mnist():
    return ma.data.load("mnist5k")


def accuracy(model, x, y, spec):
    model.eval()
    x_adv = make(spec)(model, x, y)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_meta_training_beats_the_same_budget_of_standard_training_under_pgd(mnist):
    """40 meta-steps (2 tasks x 64 digits) vs 40 ERM steps of 128 digits, same initialization. Measured
    over init seeds 0-2: meta 8.5-16% PGD accuracy, ERM 0.0%; the bound leaves room for float drift."""
    train, test = mnist
    x, y = test.x[:200], test.y[:200]
    config = ma.MetaConfig(tasks_per_batch=2, support_size=32, query_size=32, steps=40, seed=0)
    torch.manual_seed(0)
    meta = ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS, seed=0), config, progress=False)
    torch.manual_seed(0)
    erm = adversarial_train(SmallCNN(), train, method="erm", steps=40, batch_size=128, progress=False)
    pgd = "pgd_linf(eps=0.3, steps=10)"
    meta_acc, erm_acc = accuracy(meta.model, x, y, pgd), accuracy(erm.model, x, y, pgd)
    assert erm_acc < 0.05
    assert meta_acc > erm_acc + 0.05, (meta_acc, erm_acc)
    assert accuracy(meta.model, x, y, "none") > 0.5


def test_history_records_every_meta_step_with_per_task_statistics(mnist):
    train, _ = mnist
    config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=3, seed=0)
    result = ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS, seed=0), config, progress=False)
    assert [r["step"] for r in result.history] == [1, 2, 3]
    for r in result.history:
        assert sorted(r["task_names"]) == ["fgsm", "pgd_linf"]
        assert len(r["query_loss"]) == len(r["query_acc"]) == 2
        assert all(0 <= a <= 1 for a in r["query_acc"])
    assert not result.model.training


def test_same_seed_same_meta_parameters(mnist):
    train, _ = mnist

    def run(seed):
        torch.manual_seed(123)  # same initialization
        config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=3, seed=seed)
        model = ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS), config, progress=False).model
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(
    "options", [{"query_attack": "adapted"}, {"clean_weight": 0.5}, {"first_order": True, "inner_steps": 2}]
)
def test_every_option_trains_and_changes_the_model(mnist, options):
    train, _ = mnist
    model = SmallCNN()
    before = [p.detach().clone() for p in model.parameters()]
    config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=2, **options)
    ma.meta_train(model, train, ma.AttackDistribution(TASKS), config, progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_query_forward_updates_batchnorm_statistics_but_attacks_do_not(mnist):
    train, _ = mnist
    model = SmallCNN()
    config = ma.MetaConfig(tasks_per_batch=1, support_size=8, query_size=8, steps=1, sample_replace=True)
    ma.meta_train(model, train, ma.AttackDistribution(["fgsm(eps=0.3)"]), config, progress=False)
    # one meta-step = exactly one query forward pass through each BatchNorm layer
    assert int(model.features[1].num_batches_tracked) == 1


def test_bad_inputs_raise_clear_errors(mnist):
    train, _ = mnist
    dist = ma.AttackDistribution(TASKS)
    x, y = train.x[:100], train.y[:100]
    with pytest.raises(ValueError, match="needs 128 examples"):
        ma.meta_train(SmallCNN(), (x[:100], y[:100]), dist, ma.MetaConfig(support_size=32, query_size=32))
    with pytest.raises(ValueError, match="exceeds the 2 attack types"):
        ma.meta_train(SmallCNN(), train, dist, ma.MetaConfig(tasks_per_batch=3))
    with pytest.raises(ValueError, match="model has 5 classes"):
        ma.meta_train(SmallCNN(num_classes=5), (x, y), dist, ma.MetaConfig(support_size=4, query_size=4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ma.meta_train(SmallCNN(), (x * 255, y), dist, ma.MetaConfig(support_size=4, query_size=4))
    with pytest.raises(ValueError, match="NaN"):
        ma.meta_train(SmallCNN(), (x.clone().fill_(float("nan")), y), dist, ma.MetaConfig(support_size=4))
    with pytest.raises(TypeError, match="AttackDistribution"):
        ma.meta_train(SmallCNN(), train, ["fgsm(eps=0.3)"], ma.MetaConfig())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_clear_error(mnist):
    train, _ = mnist
    with pytest.raises(ValueError, match="CUDA is not available"):
        ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS), ma.MetaConfig(device="cuda"))


@pytest.mark.gpu
def test_meta_train_runs_on_cuda(mnist):
    train, _ = mnist
    config = ma.MetaConfig(tasks_per_batch=2, support_size=16, query_size=16, steps=2, device="cuda")
    result = ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS), config, progress=False)
    assert next(result.model.parameters()).is_cuda


def test_the_looped_reference_with_every_option_at_its_default_is_plain_maml_bit_for_bit():
    """The meta-step written out by hand from the public pieces (seeded data order and task sampler, one attack
    call per task on its support and query digits against the meta-parameters, second-order ``adapt`` on scratch
    BatchNorm statistics, the query pass updating the model's, the mean over tasks, Adam) gives the very bits
    ``meta_train`` gives with a default MetaConfig run looped (``batched=False``: the reference the task-batched
    default is compared against in tests/test_batched.py)."""
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 256)
    config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=3, device="cpu", batched=False)
    torch.manual_seed(0)
    trained = ma.meta_train(SmallCNN(hidden=16), (x, y), ma.AttackDistribution(TASKS, seed=0), config, progress=False)

    torch.manual_seed(0)
    model = SmallCNN(hidden=16).train()
    params, buffers = ma.functional.state(model)
    optimizer = torch.optim.Adam(params.values(), lr=config.outer_lr)
    tasks, sampler = ma.AttackDistribution(TASKS, seed=0), torch.Generator().manual_seed(config.seed + 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))
    torch.manual_seed(config.seed)  # the attacks' random starts
    for i in range(config.steps):
        idx = order[i * config.examples_per_step : (i + 1) * config.examples_per_step]
        batch = tasks.sample(2, replace=False, generator=sampler)
        chunks = ma.tasks.split_support_query(x[idx], y[idx], 2, 8, 8)
        target = ma.functional.model_fn(model, params, buffers)  # every attack targets the meta-parameters
        advs = [
            t(target, torch.cat([xs, xq]), torch.cat([ys, yq]))
            for t, (xs, ys, xq, yq) in zip(batch, chunks, strict=True)
        ]
        losses = []
        for adv, (_, ys, _, yq) in zip(advs, chunks, strict=True):
            adapted = ma.adapt(model, adv[:8], ys, params=params, steps=1, lr=config.inner_lr)
            losses.append(torch.nn.functional.cross_entropy(ma.functional.call(model, adapted, buffers, adv[8:]), yq))
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
    for k, v in model.state_dict().items():
        assert torch.equal(trained.model.state_dict()[k], v), k
