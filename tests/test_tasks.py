"""The task distribution: weights respected, reproducible, eps ranges honoured, clear errors."""

import pytest
import torch

from metaadv import AttackDistribution
from metaadv.tasks import split_support_query

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=5)", "pgd_l2(eps=2.0, steps=5)"]


def test_sampling_frequencies_follow_the_weights():
    dist = AttackDistribution(SPECS, weights=[1, 2, 7], seed=0)
    counts = torch.zeros(3)
    for _ in range(500):
        for t in dist.sample(10, replace=True):
            counts[t.type_index] += 1
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.02, rtol=0)


def test_a_seed_makes_sampling_reproducible():
    draws = [[t.attack.spec for t in AttackDistribution(SPECS, seed=3).sample(8)] for _ in range(2)]
    assert draws[0] == draws[1]
    other = [t.attack.spec for t in AttackDistribution(SPECS, seed=4).sample(8)]
    assert other != draws[0]


def test_sampling_without_replacement_gives_distinct_types():
    dist = AttackDistribution(SPECS, seed=0)
    for _ in range(20):
        assert len({t.type_index for t in dist.sample(3, replace=False)}) == 3
    with pytest.raises(ValueError, match="distinct"):
        dist.sample(4, replace=False)


def test_zero_weight_types_are_never_sampled():
    dist = AttackDistribution(SPECS, weights=[0, 1, 1], seed=0)
    assert all(t.type_index != 0 for t in dist.sample(200))


def test_eps_is_drawn_from_its_range():
    dist = AttackDistribution(SPECS, eps_ranges=[(0.1, 0.3), None, (1.0, 2.0)], seed=0)
    for t in dist.sample(300):
        lo, hi = {0: (0.1, 0.3), 1: (0.3, 0.3), 2: (1.0, 2.0)}[t.type_index]
        assert lo <= t.attack.eps <= hi
    eps = {round(t.attack.eps, 6) for t in dist.sample(50) if t.type_index == 0}
    assert len(eps) > 5, "eps must vary across draws"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"specs": []}, "at least one"),
        ({"specs": "fgsm(eps=0.3)"}, "list"),
        ({"specs": ["no_such_attack(eps=1)"]}, "no_such_attack"),
        ({"specs": ["pgd_linf(eps=-0.3)"]}, "eps"),
        ({"specs": ["pgd_linf(eps=0.3"]}, "pgd_linf"),
        ({"specs": SPECS, "weights": [1, 2]}, "one entry per spec"),
        ({"specs": SPECS, "weights": [1, -1, 1]}, "non-negative"),
        ({"specs": SPECS, "eps_ranges": [(0.3, 0.1), None, None]}, "low <= high"),
        ({"specs": ["none"], "eps_ranges": [(0.1, 0.2)]}, "no eps"),
    ],
)
def test_bad_distributions_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AttackDistribution(**kwargs)


def test_support_and_query_sets_are_disjoint_chunks():
    x = torch.arange(20.0).view(20, 1, 1, 1) / 20
    y = torch.arange(20)
    chunks = split_support_query(x, y, n_tasks=2, support_size=3, query_size=4)
    seen = torch.cat([torch.cat([ys, yq]) for _, ys, _, yq in chunks])
    assert len(set(seen.tolist())) == len(seen) == 14
    assert all(len(ys) == 3 and len(yq) == 4 for _, ys, _, yq in chunks)


def test_support_larger_than_the_batch_is_rejected():
    x, y = torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="needs 16 examples"):
        split_support_query(x, y, n_tasks=2, support_size=4, query_size=4)
