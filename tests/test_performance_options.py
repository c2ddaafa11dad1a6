"""Performance options of ``MetaConfig`` (docs/performance.md): the adversarial-example pool
(``reuse_every``) and bf16 autocast of the attacks (``autocast_attacks``)."""

import pytest
import torch

import metaadv as ma
import metaadv.meta.craft as craft
from metaadv import checkpoint as ckpt
from metaadv.attacks import make
from metaadv.functional import state
from metaadv.meta import craft_task_sets
from metaadv.meta.options.reuse import AdversarialPool
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"]


def tiny_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(48, 1, 28, 28, generator=g), torch.randint(0, 10, (48,), generator=g)


def tiny_run(tmp_path=None, steps=6, resume=False, **options):
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    tasks = ma.AttackDistribution(SPECS, seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=4, query_size=4, steps=steps, inner_lr=0.05, **options)
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return ma.meta_train(model, tiny_data(), tasks, cfg, progress=False, **where)


def count_attack_calls(monkeypatch) -> list[str]:
    """The attack types crafted, one entry per task attacked: per task (looped) or per attack family (batched)."""
    calls: list[str] = []
    original, grouped = AttackTask.__call__, craft.run_grouped

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    def counting_grouped(attacks, *args):
        calls.extend(a.name for a in attacks)
        return grouped(attacks, *args)

    monkeypatch.setattr(AttackTask, "__call__", counting)
    monkeypatch.setattr(craft, "run_grouped", counting_grouped)
    return calls


# The pool ----------------------------------------------------------------------------------------------------------


def test_each_task_type_is_attacked_once_every_reuse_every_steps(monkeypatch):
    calls = count_attack_calls(monkeypatch)
    result = tiny_run(steps=7, reuse_every=3)
    assert [r["crafted"] for r in result.history] == [[True, True], [False, False], [False, False]] * 2 + [[True] * 2]
    assert len(calls) == 3 * 2  # steps 1, 4 and 7, both types
    calls.clear()
    plain = tiny_run(steps=3)
    assert len(calls) == 3 * 2 and "crafted" not in plain.history[0]


def test_a_reused_step_trains_on_the_stored_sets_not_on_its_own_batch():
    torch.manual_seed(0)
    model = SmallCNN(hidden=16).train()
    params, buffers = state(model)
    x, y = tiny_data()
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=4, query_size=4, reuse_every=2)
    tasks = [AttackTask(make(s), i) for i, s in enumerate(SPECS)]
    pool = AdversarialPool(2)
    first = craft_task_sets(model, params, buffers, tasks, x[:16], y[:16], cfg, options=[pool], step=0)
    again = craft_task_sets(model, params, buffers, tasks, x[16:32], y[16:32], cfg, options=[pool], step=1)
    assert all(a is b for a, b in zip(first, again, strict=True))  # the very sets of step 0
    fresh = craft_task_sets(model, params, buffers, tasks, x[16:32], y[16:32], cfg, options=[pool], step=2)
    assert torch.equal(fresh[0].query_clean, x[20:24])  # step 2: crafted from its own batch again
    assert all(pool.fresh((i, 0), 2) is s for i, s in enumerate(fresh))


def test_a_resumed_run_with_reuse_equals_an_uninterrupted_one(tmp_path):
    whole = tiny_run(steps=5, reuse_every=3)
    tiny_run(tmp_path, steps=2, reuse_every=3)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert set(saved["state"]["adversarial_pool"]) == {"0.0", "1.0"}  # (type index, occurrence)
    resumed = tiny_run(tmp_path, steps=5, resume=True, reuse_every=3)  # step 3 reuses the pool of step 1
    assert [r["crafted"] for r in resumed.history] == [r["crafted"] for r in whole.history]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_reuse_changes_training_and_its_checkpoint_needs_the_same_setting(tmp_path):
    plain, reused = tiny_run(steps=3), tiny_run(steps=3, reuse_every=2)
    assert not torch.equal(plain.model.state_dict()["head.3.weight"], reused.model.state_dict()["head.3.weight"])
    tiny_run(tmp_path, steps=1, reuse_every=2)
    with pytest.raises(ckpt.CheckpointError, match="reuse_every"):
        tiny_run(tmp_path, steps=2, resume=True)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_reuse_every_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="reuse_every"):
        ma.MetaConfig(reuse_every=value)


# bf16 autocast of the attacks ----------------------------------------------------------------------------------------


def test_autocast_attacks_run_the_model_in_bf16_and_keep_the_bound(erm_model, mnist_batch):
    x, y = mnist_batch[0][:64], mnist_batch[1][:64]
    params, buffers = state(erm_model)
    tasks = [AttackTask(make("pgd_linf(eps=0.1, steps=5, random_start=False)"), 0)]
    sets = {}
    for autocast in (False, True):
        cfg = ma.MetaConfig(tasks_per_batch=1, support_size=32, query_size=32, autocast_attacks=autocast)
        sets[autocast] = craft_task_sets(erm_model, params, buffers, tasks, x, y, cfg)[0]
    fp32, bf16 = sets[False], sets[True]
    assert bf16.support.dtype == torch.float32
    assert (bf16.support - x[:32]).abs().max() <= 0.1 + 1e-6 and 0 <= bf16.support.min() <= bf16.support.max() <= 1
    assert not torch.equal(bf16.support, fp32.support)  # bf16 logits give (slightly) other gradient signs
    with torch.no_grad():
        acc = {k: (erm_model(s.support).argmax(1) == y[:32]).float().mean() for k, s in sets.items()}
    assert abs(acc[True] - acc[False]) <= 0.1  # as strong an attack, within a few digits of 32


def test_meta_train_with_autocast_attacks_learns_and_stays_finite():
    result = tiny_run(steps=3, autocast_attacks=True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in result.history)
    assert not torch.equal(
        result.model.state_dict()["head.3.weight"], tiny_run(steps=3).model.state_dict()["head.3.weight"]
    )


def test_one_type_sampled_several_times_keeps_one_pool_entry_per_occurrence():
    torch.manual_seed(0)
    model = SmallCNN(hidden=16).train()
    params, buffers = state(model)
    x, y = tiny_data()
    cfg = ma.MetaConfig(tasks_per_batch=3, support_size=4, query_size=4, reuse_every=2)
    tasks = [AttackTask(make(SPECS[0]), 0)] * 3
    pool = AdversarialPool(2)
    first = craft_task_sets(model, params, buffers, tasks, x[:24], y[:24], cfg, options=[pool], step=0)
    again = craft_task_sets(model, params, buffers, tasks, x[24:48], y[24:48], cfg, options=[pool], step=1)
    assert AdversarialPool.keys([0, 1, 0, 0]) == [(0, 0), (1, 0), (0, 1), (0, 2)]
    assert [s.query_clean.data_ptr() for s in again] == [s.query_clean.data_ptr() for s in first]  # three sets
    assert len({s.query_clean.data_ptr() for s in again}) == 3
