"""Checkpoint files and resume in-process: atomic keep-last-N writes, torn/corrupted/malicious files, RNG
state, exact resume, refusal to mix runs, SIGINT at a step boundary, and the run directory's provenance."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv import models
from metaadv.cli import main
from metaadv.engine import StepOutput, Trainable, TrainingInterrupted, fit
from metaadv.engine.resume import Checkpointing
from metaadv.models import SmallCNN
from metaadv.runs import load_run

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"]


class Evil:
    """A pickled object that would create ``path`` when unpickled (instead of, say, running a shell)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def tiny_data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny_run(steps, checkpoint_dir=None, resume=False, **config):
    """A seconds-long meta_train on random digits-shaped data; returns (flat params+buffers, result)."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    values = {"tasks_per_batch": 1, "support_size": 8, "query_size": 8, "sample_replace": True, "steps": steps}
    cfg = ma.MetaConfig(**{**values, **config})
    result = ma.meta_train(
        model, tiny_data(), ma.AttackDistribution(SPECS, seed=0), cfg, progress=False,
        checkpoint_dir=checkpoint_dir, checkpoint_every=1, resume=resume,
    )  # fmt: skip
    flat = torch.cat([t.flatten().double() for t in model.state_dict().values()])
    return flat, result


def payload(step: int = 0):
    return {"weights": torch.arange(4.0) + step, "nested": {"list": [1, 2.5, "a", None]}, "history": "{}"}


# --- files -------------------------------------------------------------------------------------


def test_round_trip_keeps_the_last_n_and_leaves_no_temporary_files(tmp_path):
    for step in range(1, 6):
        path = ckpt.save_checkpoint(tmp_path, payload(step), step=step, keep_last=2)
        assert path.name == f"ckpt-{step:08d}.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    path, loaded = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000005.pt" and loaded["step"] == 5 and loaded["format"] == ckpt.FORMAT
    assert torch.equal(loaded["weights"], torch.arange(4.0) + 5)
    assert loaded["nested"] == {"list": [1, 2.5, "a", None]}
    assert ckpt.latest_checkpoint(tmp_path / "none") is None


def test_stale_temporaries_of_a_killed_write_are_ignored_and_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, payload(1), step=1)
    stale = tmp_path / ".ckpt-00000002.pt.tmp-12345"
    stale.write_bytes(b"metaadv-checkpoint 1\nhalf a fi")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    ckpt.remove_stale_temporaries(tmp_path)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_torn_or_corrupted_newest_file_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, payload(step), step=step)
    newest = tmp_path / "ckpt-00000003.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(300))
    newest.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000003"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(ckpt.CheckpointWarning, match="ckpt-00000003"):
        path, loaded = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000002.pt" and loaded["step"] == 2


def test_every_file_bad_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_a_checkpoint_holding_a_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": ckpt.FORMAT, "step": 1, "state": {"x": Evil(marker)}}, buffer)
    body = buffer.getvalue()
    evil = tmp_path / "ckpt-00000002.pt"
    evil.write_bytes(b"metaadv-checkpoint 1\nsha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    ckpt.save_checkpoint(tmp_path, payload(1), step=1)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="could run code") as info:
        ckpt.load_checkpoint(evil)
    assert "pathlib" in str(info.value) or "getattr" in str(info.value)  # names what it refused
    with pytest.raises(ckpt.UnsafeCheckpointError):  # never skipped in favour of an older file
        ckpt.latest_checkpoint(tmp_path)
    # A plain pickle / torch.save file is not a checkpoint at all; nothing in it is unpickled.
    plain = tmp_path / "plain.pt"
    torch.save({"x": Evil(marker)}, plain)
    with pytest.raises(ckpt.CheckpointError, match="not a metaadv checkpoint"):
        ckpt.load_checkpoint(plain)
    assert not marker.exists()


@pytest.mark.parametrize("evil_file", ["model.pt", "meta_state.pt"])
def test_a_run_directory_whose_files_run_code_is_refused_by_eval(tmp_path, capsys, evil_file):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"tasks": {"specs": ["fgsm(eps=0.3)"]}, "model": {"name": "SmallCNN", "hidden": 8}}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.save(models.build(cfg["model"]).state_dict(), run / "model.pt")
    torch.save({"weight": Evil(marker)}, run / evil_file)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="could run"):
        load_run(run)
    assert main(["eval", "--checkpoint", str(run), "--attacks", "fgsm(eps=0.1)", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 400), st.integers(0, 255))
def test_fuzzed_files_only_raise_checkpoint_errors(noise, where, byte):
    valid = bytearray(ckpt.encode({**payload(), "format": ckpt.FORMAT}))
    for data in (noise, b"metaadv-checkpoint 1\n" + noise, bytes(valid[:where]) + noise):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.decode(data)
    valid[min(where, len(valid) - 1)] ^= byte or 1
    with pytest.raises(ckpt.CheckpointError):
        ckpt.decode(bytes(valid))


def test_rng_states_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    ckpt.save_checkpoint(tmp_path, {"rng": ckpt.capture_rng()}, step=1)
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    ckpt.restore_rng(ckpt.load_checkpoint(tmp_path / "ckpt-00000001.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


# --- resume --------------------------------------------------------------------------------------


def test_resume_continues_bit_for_bit_and_keeps_the_history(tmp_path):
    reference, ref = tiny_run(6)
    tiny_run(3, tmp_path, resume=True)  # a first segment (as if stopped after step 3)
    resumed, result = tiny_run(6, tmp_path, resume=True)
    assert torch.equal(resumed, reference)
    assert [r["step"] for r in result.history] == list(range(1, 7))
    assert [r["loss"] for r in result.history] == [r["loss"] for r in ref.history]
    assert [r["task_specs"] for r in result.history] == [r["task_specs"] for r in ref.history]
    saved = ckpt.load_checkpoint(tmp_path / "ckpt-00000006.pt")
    assert set(saved["state"]) == {"model", "optimizer", "task_rng", "tasks"}
    assert json.loads(saved["environment"])["metaadv"] == ma.__version__
    assert json.loads(saved["config"])["meta"]["outer_lr"] == 1e-3


def test_resume_after_a_corrupted_newest_checkpoint_still_ends_equal(tmp_path):
    reference, _ = tiny_run(5)
    tiny_run(4, tmp_path, resume=True)
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"metaadv-checkpoint 1\ntorn")
    with pytest.warns(ckpt.CheckpointWarning):
        resumed, result = tiny_run(5, tmp_path, resume=True)
    assert torch.equal(resumed, reference)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5]


def test_resume_refuses_another_runs_checkpoint_and_a_fresh_run_refuses_a_used_directory(tmp_path):
    tiny_run(2, tmp_path, resume=True)
    with pytest.raises(ckpt.CheckpointError, match="outer_lr"):
        tiny_run(3, tmp_path, resume=True, outer_lr=0.01)
    with pytest.raises(ckpt.CheckpointError, match="resume=True"):
        tiny_run(3, tmp_path)
    _, result = tiny_run(3, tmp_path, resume=True, log_every=1)  # a longer run and other logging: allowed
    assert len(result.history) == 3


def test_sigint_saves_at_the_step_boundary_then_resume_completes(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    previous = signal.getsignal(signal.SIGINT)

    def step(xb, yb, index):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if len(seen) == 2:  # during the third step
            os.kill(os.getpid(), signal.SIGINT)
        seen.append(loss.item())
        return StepOutput(loss)

    seen: list[float] = []
    trainable, loop = Trainable(model, opt, list(model.parameters())), ma.LoopConfig(batch_size=8, epochs=3)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 3") as info:
        fit(trainable, x, y, step, loop, checkpointing=Checkpointing(tmp_path, every=100), progress=False)
    assert info.value.step == 3 and info.value.checkpoint == tmp_path / "ckpt-00000003.pt"
    assert signal.getsignal(signal.SIGINT) is previous
    result = fit(trainable, x, y, step, loop, checkpointing=Checkpointing(tmp_path, resume=True), progress=False)
    assert [r["step"] for r in result.history] == list(range(1, 13))
    assert len(seen) == 12  # no step ran twice


def test_without_a_checkpoint_directory_signal_handling_is_untouched():
    model = torch.nn.Linear(4, 2)
    handlers = []

    def step(xb, yb, index):
        handlers.append(signal.getsignal(signal.SIGTERM))
        return StepOutput(model(xb).sum() * 0.0)

    trainable = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1), list(model.parameters()))
    fit(trainable, torch.randn(8, 4), torch.zeros(8, dtype=torch.long), step, ma.LoopConfig(batch_size=4, epochs=1),
        progress=False)  # fmt: skip
    assert handlers == [signal.getsignal(signal.SIGTERM)] * 2


# --- run directory ----------------------------------------------------------------------------------


def test_run_directory_records_config_versions_git_and_hardware_and_resumes(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "tasks: {specs: ['fgsm(eps=0.3)']}\n"
        "model: {name: SmallCNN, hidden: 16}\n"
        "meta: {tasks_per_batch: 1, support_size: 8, query_size: 8}\n"
    )
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--quiet", "--checkpoint-every", "1"]
    assert main([*args, "--steps", "2"]) == 0
    run = json.loads((out / "config.json").read_text())["run"]
    env = run["environment"]
    assert run["status"] == "done" and env["torch"] == torch.__version__ and env["metaadv"] == ma.__version__
    assert env["hardware"]["cpu_count"] == os.cpu_count() and env["hardware"]["torch_threads"] >= 1
    assert "gpus" in env["hardware"] and "git" in env
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=pathlib.Path(__file__).parent
    )
    if env["git"] is not None and head.returncode == 0:
        assert env["git"]["commit"] == head.stdout.strip()
    assert main([*args, "--steps", "3"]) == 2  # would overwrite the checkpoints: refused
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--steps", "3"]) == 0  # config from the run
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_cli_resume_without_a_config_needs_an_earlier_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing")]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_environment_never_fails_outside_a_git_checkout(monkeypatch):
    monkeypatch.setattr(ckpt.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    env = ckpt.environment()
    assert env["git"] is None and env["python"] == ".".join(map(str, sys.version_info[:3]))
