"""Task attention (metaadv/attention.py): weights on the simplex, trained towards softmax(L / tau).

The network is trained here on synthetic per-task statistics (no model, no attacks): a meta-batch is a
set of attack-type indices with losses, and ``stats`` follow from the losses as in a real meta-step.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from metaadv.meta.options.attention import TASK_STATISTICS, TaskAttention, task_statistics, weighted_meta_loss

N_TYPES, T = 4, 4
HARD, EASY = 3.0, 0.5  # query losses of the hard attack type (index 0) and of the others


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def stats_for(losses: Tensor, gap: Tensor | None = None) -> Tensor:
    """(T, 4) statistics of tasks whose adapted query losses are ``losses`` (T,)."""
    acc_before = torch.full_like(losses, 0.5)
    return task_statistics(
        query_loss_before=1.3 * losses,
        query_loss_after=losses,
        support_loss=0.9 * losses,
        query_acc_before=acc_before,
        query_acc_after=acc_before + (gap if gap is not None else torch.zeros_like(losses)),
    )


def hard_type_batch(g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A meta-batch of T tasks sampled with replacement; type 0 has a much higher loss (+-10% noise)."""
    types = torch.randint(N_TYPES, (T,), generator=g)
    losses = torch.where(types == 0, HARD, EASY) * (1 + 0.1 * torch.randn(T, generator=g))
    return types, stats_for(losses, 0.05 * torch.randn(T, generator=g)), losses


def train(att: TaskAttention, batch, steps: int = 300, lr: float = 0.02) -> TaskAttention:
    """Minimize ``att.attention_loss`` with Adam over meta-batches ``batch()`` -> (types, stats, losses)."""
    opt = torch.optim.Adam(att.parameters(), lr=lr)
    for _ in range(steps):
        types, stats, losses = batch()
        loss = att.attention_loss(att(types, stats), losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return att


def randomized(att: TaskAttention) -> TaskAttention:
    """The module with every parameter redrawn (a fresh one is exactly uniform)."""
    with torch.no_grad():
        for p in att.parameters():
            p.normal_()
    return att


def test_a_fresh_module_gives_uniform_weights():
    att = TaskAttention(N_TYPES)
    types, stats, _ = hard_type_batch(torch.Generator().manual_seed(0))
    assert torch.equal(att(types, stats), torch.full((T,), 1 / T))


@pytest.mark.parametrize("n_tasks", [1, 2, 5, 8])
def test_weights_are_positive_sum_to_one_and_take_the_unknown_type(n_tasks):
    att = randomized(TaskAttention(N_TYPES, hidden=8))
    g = torch.Generator().manual_seed(n_tasks)
    for scale in (1e-6, 1.0, 1e6):  # losses of any scale: the MLP sees them relative to their mean
        types = torch.randint(N_TYPES + 1, (n_tasks,), generator=g)
        types[0] = att.unknown_type
        stats = stats_for(scale * torch.rand(n_tasks, generator=g), 2 * torch.rand(n_tasks, generator=g) - 1)
        w = att(types, stats)
        assert w.shape == (n_tasks,) and w.dtype == torch.float32
        assert (w > 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_the_features_are_invariant_to_the_scale_of_the_losses():
    att = randomized(TaskAttention(N_TYPES))
    types, stats, _ = hard_type_batch(torch.Generator().manual_seed(1))
    scaled = stats.clone()
    scaled[:, :3] *= 10.0
    assert torch.allclose(att(types, stats), att(types, scaled), atol=1e-6)


def test_trained_weights_move_to_the_hard_attack_type_without_collapsing():
    g = torch.Generator().manual_seed(0)
    att = train(TaskAttention(N_TYPES, entropy=1.0), lambda: hard_type_batch(g))
    types = torch.arange(N_TYPES)  # one task of each type, type 0 hard
    w = att(types, stats_for(torch.tensor([HARD, EASY, EASY, EASY])))
    assert w[0] > 0.6  # uniform: 0.25; the optimum softmax(L / tau): 0.80
    assert (w[1:] > 0.03).all() and w.max() < 0.95  # the entropy bonus keeps every task in play
    assert torch.equal(att.type_embedding.weight[att.unknown_type], torch.zeros(16))  # the unknown code is untrained


def test_identical_tasks_get_uniform_weights():
    g = torch.Generator().manual_seed(0)
    same = (torch.zeros(T, dtype=torch.long), stats_for(torch.full((T,), 1.2)), torch.full((T,), 1.2))
    att = train(TaskAttention(N_TYPES), lambda: same, steps=100)
    assert torch.allclose(att(*same[:2]), torch.full((T,), 1 / T), atol=1e-6)
    # after learning that type 0 is hard, a meta-batch of type-0 tasks with equal statistics is still uniform
    att = train(TaskAttention(N_TYPES), lambda: hard_type_batch(g))
    for types in (torch.zeros(T, dtype=torch.long), torch.full((T,), att.unknown_type)):
        assert torch.allclose(att(types, stats_for(torch.full((T,), HARD))), torch.full((T,), 1 / T), atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_for_fixed_losses_the_weights_approach_the_closed_form_softmax_of_loss_over_tau(tau):
    losses = torch.tensor([0.4, 1.0, 1.6, 2.2])
    batch = (torch.arange(N_TYPES), stats_for(losses), losses)
    att = train(TaskAttention(N_TYPES, entropy=tau), lambda: batch, steps=400, lr=0.05)
    optimum = torch.softmax(losses / tau, dim=0)
    assert torch.allclose(att(*batch[:2]), optimum, atol=0.01)
    # and it is the minimizer of the attention loss over the simplex
    assert att.attention_loss(optimum, losses) < att.attention_loss(torch.full((T,), 1 / T), losses)


def test_attention_loss_reaches_the_network_but_not_the_losses_and_the_meta_loss_the_reverse():
    att = randomized(TaskAttention(N_TYPES))
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)  # stands in for the meta-parameters
    losses = theta**2  # (T,) with a graph to theta
    w = att(torch.arange(N_TYPES), stats_for(losses.detach()))

    att.attention_loss(w, losses).backward(retain_graph=True)
    assert theta.grad is None
    attention_grads = [p.grad.clone() for p in att.parameters()]
    assert sum(g.norm() for g in attention_grads) > 0

    att.zero_grad(set_to_none=True)
    weighted_meta_loss(w, losses).backward(retain_graph=True)
    assert all(p.grad is None for p in att.parameters())
    assert torch.allclose(theta.grad, 2 * w.detach() * theta.detach())

    # one backward of the sum gives each player exactly its own gradient
    theta.grad = None
    (weighted_meta_loss(w, losses) + att.attention_loss(w, losses)).backward()
    assert torch.allclose(theta.grad, 2 * w.detach() * theta.detach())
    assert all(torch.allclose(p.grad, g) for p, g in zip(att.parameters(), attention_grads, strict=True))


def test_the_state_dict_round_trips():
    g = torch.Generator().manual_seed(0)
    att = train(TaskAttention(N_TYPES, entropy=0.5), lambda: hard_type_batch(g), steps=20)
    again = TaskAttention(N_TYPES, entropy=0.5)
    again.load_state_dict(att.state_dict())
    types, stats, _ = hard_type_batch(g)
    assert torch.equal(att(types, stats), again(types, stats))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_types": 0}, "n_types must be an integer >= 1"),
        ({"n_types": 2.0}, "n_types"),
        ({"n_types": 2, "hidden": 0}, "hidden"),
        ({"n_types": 2, "entropy": 0.0}, r"entropy \(tau\) must be a finite number > 0"),
        ({"n_types": 2, "entropy": -1.0}, "entropy"),
        ({"n_types": 2, "entropy": float("inf")}, "entropy"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskAttention(**kwargs)


def test_bad_inputs_are_refused_with_a_clear_error():
    att = TaskAttention(N_TYPES)
    types, stats = torch.arange(T), stats_for(torch.ones(T))
    bad = [
        ((types.float(), stats), "type_index must be a \\(T,\\) integer tensor"),
        ((types[None], stats), "type_index must be a \\(T,\\) integer tensor"),
        ((types[:0], stats[:0]), "at least one task"),
        ((types, stats[:, :3]), r"stats must be a floating tensor of shape \(4, 4\)"),
        ((types[:3], stats), r"shape \(3, 4\)"),
        ((torch.tensor([0, 1, 2, N_TYPES + 1]), stats), r"type_index must lie in \[0, 4\]"),
        ((torch.tensor([0, -1, 2, 3]), stats), r"type_index must lie in \[0, 4\]"),
        ((types, stats.index_fill(0, torch.tensor([1]), float("nan"))), "stats must be finite"),
        ((types, stats_for(torch.tensor([1.0, -1.0, 1.0, 1.0]))), "loss columns of stats must be >= 0"),
        ((types, stats_for(torch.ones(T), torch.full((T,), 1.5))), r"accuracy_gap column .* \[-1, 1\]"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            att(*args)
    w = att(types, stats)
    with pytest.raises(ValueError, match="one shape"):
        att.attention_loss(w, torch.ones(T + 1))
    with pytest.raises(ValueError, match="one shape"):
        weighted_meta_loss(w[None], torch.ones(1, T))
    with pytest.raises(ValueError, match="five tensors of one shape"):
        task_statistics(query_loss_before=torch.ones(T), query_loss_after=torch.ones(T), support_loss=torch.ones(T),
                        query_acc_before=torch.ones(T), query_acc_after=torch.ones(T + 1))  # fmt: skip
    assert len(TASK_STATISTICS) == stats.shape[1] == 4
