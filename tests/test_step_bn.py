"""Per-step BatchNorm statistics (``MetaConfig.per_step_bn``, MAML++) and evaluate's inner-loop options.

Set k of the K + 1 sets holds the running statistics of the forward passes at the k-th inner iterate theta^(k):
the support pass of step k (k < K), the query pass (k = K). Set 0 is the model's own buffers.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import Poisonable, PoisonedTasks

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.functional import call, clone_buffers, state
from metaadv.meta import TaskSets, meta_batch_loss, query_loss, task_losses
from metaadv.meta.options.step_bn import StepBatchNorm
from metaadv.meta.train import FIRST_FIELDS
from metaadv.models import SmallCNN
from metaadv.tasks import AttackTask

TWO_TYPES = ["none", "noise(eps=0.5)"]  # no gradient in the attacks: cheap
LR = 0.1


def running(buffers):
    return {k: v for k, v in buffers.items() if "running" in k}


def equal(a, b) -> bool:
    return all(torch.equal(v, b[k]) for k, v in running(a).items())


def differ(a, b) -> bool:
    return all(not torch.equal(v, b[k]) for k, v in running(a).items() if "mean" in k)


def one_task(n: int = 8):
    """A fresh seeded training-mode SmallCNN, one task (clean digits) and its support/query sets."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=16).train()
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 2 * n)
    sets = TaskSets(support=x[:n], support_y=y[:n], query=x[n:], query_clean=x[n:], query_y=y[n:])
    return model, [AttackTask(ma.attacks.make("none"), 0)], [sets]


def config(**options):
    """The looped reference step (its bits are compared with hand-written passes; tests/test_batched.py compares
    the batched step with it)."""
    return ma.MetaConfig(tasks_per_batch=1, support_size=8, query_size=8, inner_steps=2, inner_lr=LR,
                         **{"batched": False, **options})  # fmt: skip


def tiny_run(tmp_path=None, steps=3, resume=False, **options):
    x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 128)
    torch.manual_seed(0)
    cfg = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, inner_steps=2, inner_lr=LR, steps=steps,
                        **options)  # fmt: skip
    where = {"checkpoint_dir": tmp_path, "checkpoint_every": 1, "resume": resume} if tmp_path else {}
    return ma.meta_train(SmallCNN(hidden=16), (x, y), ma.AttackDistribution(TWO_TYPES, seed=0), cfg, progress=False,
                         **where)  # fmt: skip


# The meta-step ------------------------------------------------------------------------------------------------------


def test_without_per_step_bn_the_loss_stage_is_plain_maml_bit_for_bit():
    """Default: the inner loop on scratch statistics, only the query pass at theta^(K) updates ``buffers``."""
    model, tasks, sets = one_task()
    params, buffers = state(model)
    start = clone_buffers(buffers)
    loss, q_loss, _ = task_losses(model, params, buffers, tasks, sets, config())
    s = sets[0]
    ref_buffers = clone_buffers(start)
    adapted = ma.adapt(model, s.support, s.support_y, params=params, steps=2, lr=LR)
    ref_loss, ref_query_loss, _ = query_loss(model, adapted, ref_buffers, s.query, s.query_clean, s.query_y, 0.0)
    assert torch.equal(loss[0], ref_loss) and torch.equal(q_loss[0], ref_query_loss)
    assert equal(buffers, ref_buffers)


def test_set_k_holds_the_statistics_of_the_passes_at_theta_k_and_the_loss_is_unchanged():
    model, tasks, sets = one_task()
    params, buffers = state(model)
    start = clone_buffers(buffers)
    step_bn = StepBatchNorm(model, buffers, 2)
    loss, _, _ = task_losses(model, params, buffers, tasks, sets, config(per_step_bn=True), options=[step_bn])

    # By hand: the iterates theta^(0..2), each set a fresh copy of the start updated by one pass at its iterate.
    s = sets[0]
    thetas = [ma.adapt(model, s.support, s.support_y, params=params, steps=k, lr=LR) for k in range(3)]
    expected = [clone_buffers(start) for _ in range(3)]
    for theta, stats, x in zip(thetas, expected, [s.support, s.support, s.query], strict=True):
        call(model, theta, stats, x)
    kept = step_bn.sets(buffers)
    assert len(kept) == 3 and kept[0] is buffers  # set 0 is the model's own: statistics at the meta-parameters
    for k in range(3):
        assert equal(kept[k], expected[k]), k
    assert differ(kept[0], kept[1]) and differ(kept[1], kept[2]) and differ(kept[0], kept[2])
    # Training-mode passes normalize with their batch's statistics: the meta-loss does not change.
    plain_model, _, _ = one_task()
    plain_params, plain_buffers = state(plain_model)
    plain, _, _ = task_losses(plain_model, plain_params, plain_buffers, tasks, sets, config())
    assert torch.equal(loss, plain)


def test_the_step_statistics_go_with_per_step_bn_and_only_with_it():
    model, tasks, sets = one_task()
    params, buffers = state(model)
    x, y = torch.cat([sets[0].support, sets[0].query]), torch.cat([sets[0].support_y, sets[0].query_y])
    with pytest.raises(ValueError, match="StepBatchNorm \\(per_step_bn\\)"):  # the option is on: its statistics needed
        meta_batch_loss(model, params, buffers, tasks, x, y, config(per_step_bn=True))
    with pytest.raises(ValueError, match="StepBatchNorm"):  # the option is off: no statistics
        meta_batch_loss(model, params, buffers, tasks, x, y, config(), options=[StepBatchNorm(model, buffers, 2)])
    with pytest.raises(ValueError, match="step_bn holds statistics for 1 inner steps"):  # sets for another K
        task_losses(model, params, buffers, tasks, sets, config(per_step_bn=True),
                    options=[StepBatchNorm(model, buffers, 1)])  # fmt: skip
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        StepBatchNorm(SmallCNN(batch_norm=False, hidden=16), {}, 2)


def test_adapt_takes_one_buffer_dict_per_inner_step():
    model, _, sets = one_task()
    s = sets[0]
    _, buffers = state(model)
    with pytest.raises(ValueError, match="one per inner step"):
        ma.adapt(model, s.support, s.support_y, buffers=[clone_buffers(buffers)], steps=2)
    with pytest.raises(TypeError, match="buffers must be a mapping"):
        ma.adapt(model, s.support, s.support_y, buffers=[1, 2], steps=2)
    one = clone_buffers(buffers)
    repeated = ma.adapt(model, s.support, s.support_y, buffers=one, steps=2, lr=LR)
    each = ma.adapt(model, s.support, s.support_y, buffers=[one, one], steps=2, lr=LR)  # the same dict twice
    assert all(torch.equal(v, each[k]) for k, v in repeated.items())


# meta_train ---------------------------------------------------------------------------------------------------------


def test_meta_train_keeps_three_distinct_sets_and_the_same_parameters():
    plain = tiny_run()
    result = tiny_run(per_step_bn=True)
    assert "step_bn" not in plain.artifacts and result.step_bn.steps == 2
    sets = result.step_bn.sets(dict(result.model.named_buffers()))
    assert differ(sets[0], sets[1]) and differ(sets[1], sets[2]) and differ(sets[0], sets[2])
    for k, v in plain.model.named_parameters():  # which statistics are kept changes, the meta-gradient does not
        assert torch.equal(dict(result.model.named_parameters())[k], v), k
    assert differ(dict(plain.model.named_buffers()), sets[0])  # set 0: at theta, not at theta^(K)
    assert "per_step_bn" not in FIRST_FIELDS  # recorded in checkpoints only when on


def test_a_skipped_step_leaves_the_sets_unchanged():
    def poisoned_run(steps, bad):  # step 2 sees NaN inputs: every set moves to NaN, then the step is skipped
        x, y = ma.data.to_tensors(ma.data.load("mnist5k")[0], 128)
        torch.manual_seed(0)
        model = Poisonable()
        cfg = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, inner_steps=2, inner_lr=LR, steps=steps,
                            per_step_bn=True)  # fmt: skip
        return ma.meta_train(model, (x, y), PoisonedTasks(TWO_TYPES, model, bad, seed=0), cfg, progress=False)

    after_one, result = poisoned_run(1, set()), poisoned_run(2, {2})
    assert [r["skipped"] for r in result.history] == [False, True]
    for mine, theirs in zip(result.step_bn.stats, after_one.step_bn.stats, strict=True):
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert equal(dict(result.model.named_buffers()), dict(after_one.model.named_buffers()))


def test_a_resume_equals_an_uninterrupted_run(tmp_path):
    whole = tiny_run(steps=4, per_step_bn=True)
    tiny_run(tmp_path, steps=2, per_step_bn=True)
    saved = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert len(saved["state"]["step_bn"]["stats"]) == 2
    resumed = tiny_run(tmp_path, steps=4, resume=True, per_step_bn=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for mine, theirs in zip(resumed.step_bn.stats, whole.step_bn.stats, strict=True):
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


# evaluate -----------------------------------------------------------------------------------------------------------

ATTACK = "fgsm(eps=0.1)"


@pytest.fixture(scope="module")
def trained(mnist5k):
    """A small SmallCNN trained for 32 steps of 64 digits (a few seconds; about 80% clean), in eval mode."""
    train, _ = mnist5k
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for idx in torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))[: 32 * 64].split(64):
        opt.zero_grad()
        F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
        opt.step()
    return model.eval()


def report(model, mnist5k, **options):
    _, test = mnist5k
    opts = {"n_examples": 48, "adapt_shots": 16, "adapt_steps": 1, "adapt_methods": ("sgd", "bn")}
    return ma.evaluate(model, test, ATTACK, **{**opts, **options})


def shifted(model, steps: int, which: int) -> StepBatchNorm:
    """Per-step statistics equal to the model's, except set ``which`` (1..K) whose means are off by 3."""
    step_bn = StepBatchNorm(model, dict(model.named_buffers()), steps)
    for k, v in step_bn.stats[which - 1].items():
        if "running_mean" in k:
            v.add_(3.0)
    return step_bn


def test_evaluate_normalizes_the_sgd_adapted_model_with_the_last_set(trained, mnist5k):
    spec = ma.attacks.make(ATTACK).spec
    plain = report(trained, mnist5k)
    same = report(trained, mnist5k, step_bn=StepBatchNorm(trained, dict(trained.named_buffers()), 2))
    assert same.adapted == plain.adapted and same.meta["step_bn"] and not plain.meta["step_bn"]
    last = report(trained, mnist5k, step_bn=shifted(trained, 2, which=2))
    assert last.adapted["sgd"][spec] != plain.adapted["sgd"][spec]  # the adapted model uses set K
    assert last.adapted["bn"] == plain.adapted["bn"] and last.per_attack == plain.per_attack  # the rest: unchanged
    middle = report(trained, mnist5k, step_bn=shifted(trained, 2, which=1))  # set 1: only SGD step 1 uses it
    assert middle.adapted == plain.adapted  # adapt_steps=1 takes step 0 only (set 0), and the result uses set 2


def test_learned_step_sizes_of_zero_leave_the_model_unadapted(trained, mnist5k):
    zeros = {k: torch.zeros_like(p) for k, p in trained.named_parameters()}
    out = report(trained, mnist5k, adapt_lr=zeros, adapt_steps=2, adapt_methods=("sgd",))
    spec = ma.attacks.make(ATTACK).spec
    assert out.adapted["sgd"][spec] == out.per_attack[spec] and out.adapted_clean["sgd"][spec] == out.clean_acc
    assert out.meta["adapt_lr"] == "learned"
    moved = report(trained, mnist5k, adapt_lr=1.0, adapt_steps=2, adapt_methods=("sgd",))  # a real step does move
    assert moved.adapted_clean["sgd"][spec] != moved.clean_acc or moved.adapted["sgd"][spec] != moved.per_attack[spec]


def test_adapt_params_head_changes_only_the_head_and_the_options_reach_adapt(trained, mnist5k, monkeypatch):
    seen = []

    def spy(model, *args, **kwargs):
        theta = ma.adapt(model, *args, **kwargs)
        seen.append((kwargs, kwargs["params"], theta))
        return theta

    monkeypatch.setattr(importlib.import_module("metaadv.eval.adaptation"), "adapt", spy)
    out = report(trained, mnist5k, adapt_params="head", adapt_proximal=0.5, adapt_lr=0.1, adapt_methods=("sgd",))
    [(kwargs, params, theta)] = seen
    assert kwargs["inner_params"] == "head" and kwargs["proximal"] == 0.5
    changed = sorted(k for k, v in theta.items() if not torch.equal(v, params[k]))
    assert changed == ["head.3.bias", "head.3.weight"]
    assert out.meta["adapt_params"] == "head" and out.meta["adapt_proximal"] == 0.5


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"adapt_params": "body"}, ValueError, "adapt_params must be one of"),
        ({"adapt_proximal": -1.0}, ValueError, "adapt_proximal"),
        ({"adapt_lr": {"head.3.weight": torch.zeros(1)}}, ValueError, "adapt_lr must hold one tensor per adapted"),
        ({"step_bn": "stats"}, TypeError, "step_bn must be a StepBatchNorm"),
    ],
)
def test_bad_inner_loop_options_are_refused(options, error, match):
    model = SmallCNN(hidden=8).eval()
    data = (torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    with pytest.raises(error, match=match):
        ma.evaluate(model, data, "none", adapt_shots=2, **options)


def test_a_wrongly_shaped_learned_step_size_is_refused():
    model = SmallCNN(hidden=8).eval()
    lr = {k: torch.zeros(1) for k, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"adapt_lr\['.*'\] must be a tensor of shape"):
        ma.evaluate(model, (torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))), "none", adapt_lr=lr)
