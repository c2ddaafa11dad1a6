"""Shared fixtures: a standard-trained (ERM) SmallCNN on mnist5k and 200 test digits (CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaadv.data import load
from metaadv.models import SmallCNN


@pytest.fixture(scope="session")
def mnist5k():
    """(train, test) TensorDatasets of the embedded mnist5k digits: x (N, 1, 28, 28) in [0, 1], y (N,)."""
    return load("mnist5k")


@pytest.fixture(scope="session")
def erm_model(mnist5k) -> SmallCNN:
    """A SmallCNN trained normally (2 epochs, batch 128, Adam 1e-3, seed 0): ~95-97% clean test accuracy.

    Returned in eval mode. Session-scoped and shared: tests must not change its mode or weights
    (attack tests check that attacks do not).
    """
    train, _ = mnist5k
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(train.y), generator=gen).split(128):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture(scope="session")
def images() -> tuple[Tensor, Tensor]:
    """64 random images x (64, 1, 28, 28) in [0, 1] and labels y (64,) in 0..9."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same tensors, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="session")
def mnist_batch(mnist5k) -> tuple[Tensor, Tensor]:
    """The first 200 test digits: x (200, 1, 28, 28) in [0, 1], y (200,)."""
    _, test = mnist5k
    return test.x[:200].clone(), test.y[:200].clone()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them (with the reason shown) on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class PoisonedTasks:
    """An ``AttackDistribution`` that sets ``model.poison`` while the meta-steps listed in ``bad`` (1-based) run.

    ``meta_train`` samples the tasks once at the start of every meta-step, so the flag covers that step's
    crafting, inner loop and query passes; a model reading it (``Poisonable`` in test_faults.py) turns them NaN.
    The call count is part of the sampler's state, as a real fault is a function of the run's state: the engine
    replays a window with a bad step from the window's start, and the replay meets the same faults.
    """

    def __new__(cls, specs, model, bad, **kwargs):
        from metaadv import AttackDistribution

        class Poisoned(AttackDistribution):
            def sample(self, *args, **kw):
                self.calls += 1
                model.poison = self.calls in bad
                return super().sample(*args, **kw)

            def state_dict(self):  # the count is the run's state: a rolled-back window replays the same faults
                return {**super().state_dict(), "calls": self.calls}

            def load_state_dict(self, state):
                super().load_state_dict(state)
                self.calls = state["calls"]

        tasks = Poisoned(specs, **kwargs)
        tasks.calls = 0
        return tasks


class Poisonable(nn.Module):
    """SmallCNN whose input turns to NaN while ``poison`` is set: NaN reaches the BatchNorm statistics,
    the loss and every gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(hidden=16)
        self.poison = False

    def forward(self, x):
        return self.net(x * float("nan") if self.poison else x)
