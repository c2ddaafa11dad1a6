"""The persistent generator task (``MetaConfig.persistent_generator``, ``PersistentGenerators``): each
``generator(...)`` task type keeps one generator for the whole run, trained against the meta-model every time
the type is sampled, checkpointed, and still available as a fresh (white-box) held-out attack in evaluate."""

import copy

import pytest
import torch

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.attacks import GeneratorAttack, make
from metaadv.functional import model_fn, state
from metaadv.meta import craft_task_sets
from metaadv.meta.options.generators import PersistentGenerators
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask

GEN = "generator(eps=0.3, steps=2, width=4)"
SPECS = ["fgsm(eps=0.3)", GEN]


def tiny_data(n: int = 48):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny_run(tmp_path=None, steps=3, resume=False, specs=SPECS, **options):
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    tasks = ma.AttackDistribution(specs, seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=4, query_size=4, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return ma.meta_train(model, tiny_data(), tasks, cfg, progress=False, **where)


def adam_steps(gen: GeneratorAttack) -> int:
    return int(gen.opt.state_dict()["state"][0]["step"])


def net_state(gen: GeneratorAttack) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gen.net.state_dict().items()}


def small_target():
    torch.manual_seed(0)
    model = SmallCNN(hidden=16).train()
    params, buffers = state(model)
    return model, params, buffers


def test_a_generator_type_keeps_one_generator_that_trains_at_every_sampling():
    result = tiny_run(steps=3, persistent_generator=True)
    (index, gen), = result.generators.attacks.items()  # fmt: skip
    assert index == 1 and (gen.eps, gen.steps, gen.width) == (0.3, 2, 4)
    sampled = sum(r["task_names"].count("generator") for r in result.history)
    assert sampled == 3 and adam_steps(gen) == 2 * sampled  # one generator's Adam state across all meta-steps


def test_the_second_sampling_starts_from_the_weights_the_first_left():
    model, params, buffers = small_target()
    x, y = tiny_data(8)
    gens = PersistentGenerators(ma.AttackDistribution(SPECS, seed=0), x[:0])
    task = gens.bind([AttackTask(make(GEN), 1)])[0]
    init = net_state(gens.attacks[1])
    target = model_fn(model, params, buffers)
    task(target, x, y)
    after_first = copy.deepcopy(gens.attacks[1].state_dict())
    assert any(not torch.equal(v, after_first["net"][k]) for k, v in init.items())
    twin = GeneratorAttack(0.3, steps=2, width=4, like=x)
    twin.load_state_dict(copy.deepcopy(after_first))
    second = task(target, x, y)
    assert torch.equal(second, twin(target, x, y))  # call 2 continues from call 1's weights and Adam state
    assert not torch.equal(second, make(GEN)(target, x, y))  # a fresh generator (the option off) crafts others


def test_generator_examples_stay_within_the_drawn_eps_and_the_unit_box():
    model, params, buffers = small_target()
    x, y = tiny_data(16)
    dist = ma.AttackDistribution(SPECS, eps_ranges=[None, (0.05, 0.1)], seed=0)
    gens = PersistentGenerators(dist, x[:0])
    tasks = gens.bind(dist.sample(2, replace=False, generator=torch.Generator().manual_seed(0)))
    gen_task = next(t for t in tasks if t.runner is not None)
    eps = gen_task.attack.eps
    assert 0.05 <= eps <= 0.1 and gens.attacks[1].eps == 0.3  # drawn per task, not the spec's 0.3
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=4, query_size=4)
    sets = craft_task_sets(model, params, buffers, tasks, x, y, cfg)
    i = tasks.index(gen_task)
    clean = x[8 * i : 8 * i + 8]  # the task's support and query examples
    adv = torch.cat([sets[i].support, sets[i].query])
    assert (adv - clean).abs().max() <= eps + 1e-6 and (adv - clean).abs().max() > 0
    assert adv.min() >= 0 and adv.max() <= 1
    assert adam_steps(gens.attacks[1]) == 2


def test_the_batched_meta_step_trains_the_persistent_generator_per_task():
    result = tiny_run(steps=2, persistent_generator=True, batched=True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in result.history)
    assert adam_steps(result.generators.attacks[1]) == 2 * 2  # not grouped into a fresh run_grouped call


def test_the_batched_meta_step_with_adapted_queries_trains_the_generator_on_support_and_query_sets():
    result = tiny_run(steps=2, persistent_generator=True, batched=True, query_attack="adapted")
    looped = tiny_run(steps=2, persistent_generator=True, query_attack="adapted")
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in result.history)
    assert adam_steps(result.generators.attacks[1]) == adam_steps(looped.generators.attacks[1]) > 2 * 2


def test_the_option_changes_training_and_off_is_the_plain_run():
    plain, off, on = tiny_run(), tiny_run(persistent_generator=False), tiny_run(persistent_generator=True)
    assert [r["loss"] for r in off.history] == [r["loss"] for r in plain.history] and "generators" not in off.artifacts
    for k, v in plain.model.state_dict().items():
        assert torch.equal(off.model.state_dict()[k], v), k
    assert [r["loss"] for r in on.history] != [r["loss"] for r in plain.history]


def test_a_resumed_run_equals_an_uninterrupted_one_generators_included(tmp_path):
    whole = tiny_run(steps=4, persistent_generator=True)
    tiny_run(tmp_path, steps=2, persistent_generator=True)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert set(saved["state"]["generators"]) == {"1"}
    resumed = tiny_run(tmp_path, steps=4, resume=True, persistent_generator=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in whole.generators.attacks[1].net.state_dict().items():
        assert torch.equal(resumed.generators.attacks[1].net.state_dict()[k], v), k
    assert adam_steps(resumed.generators.attacks[1]) == adam_steps(whole.generators.attacks[1]) == 8


def test_a_distribution_without_a_generator_type_is_refused():
    with pytest.raises(ValueError, match="persistent_generator=True needs a 'generator"):
        tiny_run(steps=1, specs=["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], persistent_generator=True)


def test_binding_tasks_of_another_distribution_is_refused():
    gens = PersistentGenerators(ma.AttackDistribution(SPECS, seed=0), tiny_data(1)[0])
    with pytest.raises(ValueError, match="not a generator"):
        gens.bind([AttackTask(make("pgd_linf(eps=0.3)"), 1)])

    with pytest.raises(ValueError, match="pass like="):
        GeneratorAttack(0.3).load_state_dict(gens.attacks[1].state_dict())  # not built: channels unknown


def test_the_registered_generator_is_still_a_fresh_held_out_attack_in_evaluate():
    result = tiny_run(steps=1, specs=["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"])
    x, y = tiny_data(16)
    report = ma.evaluate(result.model, (x, y), [GEN, "none"], batch_size=16)
    assert set(report.per_attack) == {make(GEN).spec, "none"}
    assert 0 <= report.per_attack[make(GEN).spec] <= 1 and report.per_attack["none"] == report.clean_acc
    again = ma.evaluate(result.model, (x, y), [GEN], batch_size=16)
    assert again.per_attack == {make(GEN).spec: report.per_attack[make(GEN).spec]}  # seeded, nothing kept
