"""Task-parallel meta-training: 2 gloo processes on CPU reach the meta-parameters of one process on the same
meta-batches, hold identical parameters, count BatchNorm updates as one process would, and resume exactly.

Run as a script, this file is one rank of that run (``WORLD_SIZE``, ``RANK``, ... set as torchrun sets them):

    python tests/test_distributed.py OUT_FILE CHECKPOINT_DIR
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import metaadv as ma
from metaadv import distributed
from metaadv.models import SmallCNN

TASKS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2, random_start=False)"]  # deterministic: no random starts
RANDOM_TASKS = ["fgsm_rs(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"]  # random starts, drawn per rank
CONFIG = {"tasks_per_batch": 4, "support_size": 8, "query_size": 8, "sample_replace": True, "steps": 3}
OPTIONS = {"outer_optimizer": "sgd", "outer_lr": 0.05}  # SGD: float noise stays float noise (Adam divides by it)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two meta-batches' worth of random images (N, 1, 28, 28) and labels: the run crosses an epoch boundary."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)


def train(batch_norm: bool, steps: int, tasks: list[str] = TASKS, **checkpoints) -> ma.TrainResult:
    torch.manual_seed(0)
    model = SmallCNN(hidden=16, batch_norm=batch_norm)
    config = ma.MetaConfig(**{**CONFIG, "steps": steps}, **OPTIONS)
    return ma.meta_train(model, data(), ma.AttackDistribution(tasks, seed=0), config, progress=False, **checkpoints)


def worker(out: str, checkpoint_dir: str) -> None:
    """One rank: meta-train without BatchNorm for 3 steps, with it for 1, and with random starts for 4 steps
    straight and for 2 + 2 steps resumed from a checkpoint; save the results."""
    torch.set_num_threads(1)
    plain, bn = train(batch_norm=False, steps=3), train(batch_norm=True, steps=1)
    straight = train(batch_norm=True, steps=4, tasks=RANDOM_TASKS)
    train(batch_norm=True, steps=2, tasks=RANDOM_TASKS, checkpoint_dir=checkpoint_dir)
    resumed = train(batch_norm=True, steps=4, tasks=RANDOM_TASKS, checkpoint_dir=checkpoint_dir, resume=True)
    distributed.shutdown()
    states = {name: r.model.state_dict() for name, r in [("plain", plain), ("bn", bn), ("straight", straight),
                                                          ("resumed", resumed)]}  # fmt: skip
    torch.save({**states, "history": plain.history}, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """The outputs of rank 0 and rank 1 of a 2-process gloo run."""
    tmp = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(tmp / f"rank{r}.pt"), str(tmp / "checkpoints")],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:  # a rank left waiting for a dead peer
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), errors
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_processes_reach_the_meta_parameters_of_one(two_ranks):
    torch.set_num_threads(1)
    single = train(batch_norm=False, steps=3)
    reference = single.model.state_dict()
    for r, out in enumerate(two_ranks):
        for name, value in reference.items():
            torch.testing.assert_close(out["plain"][name], value, rtol=0, atol=1e-5, msg=f"rank {r}: {name}")
    for before, after in zip(single.history, two_ranks[0]["history"], strict=True):
        assert after["task_specs"] == before["task_specs"]  # the same tasks, in meta-batch order
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)
        assert after["query_acc"] == pytest.approx(before["query_acc"], abs=1e-6)
    torch.manual_seed(0)
    initial = SmallCNN(hidden=16, batch_norm=False).state_dict()
    assert max(float((reference[k] - v).abs().max()) for k, v in initial.items()) > 1e-3  # training moved them


def test_ranks_hold_identical_parameters_and_batchnorm_statistics(two_ranks):
    a, b = two_ranks
    for part in ("plain", "bn", "resumed"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    # one meta-step of 4 tasks is 4 query passes through each BatchNorm layer, split 2 + 2 over the ranks
    assert int(a["bn"]["features.1.num_batches_tracked"]) == CONFIG["tasks_per_batch"]


def test_a_resumed_run_equals_an_uninterrupted_one_on_every_rank(two_ranks):
    for out in two_ranks:  # every rank restores its own attack random stream from the checkpoint
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), name


def test_tasks_per_batch_must_divide_among_the_processes():
    assert distributed.shard(4, 1, 2) == slice(2, 4)
    with pytest.raises(ValueError, match=r"tasks_per_batch=3 is not divisible by the world size 2"):
        distributed.shard(3, 0, 2)


def test_one_process_without_torchrun_is_rank_zero_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
