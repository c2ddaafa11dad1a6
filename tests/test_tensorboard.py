"""TensorBoard logging through the engine, read back with TensorBoard's own reader (tiny models, CPU).

What each run logs (loss, gradient norm, bad steps, learning rates, per-task curves, the config as text and
hyper-parameters), a resumed run continuing its curves without duplicates, evaluation reports,
``metaadv train --tensorboard``, and training that is bit for bit the same with logging on or off.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import same_weights

import metaadv as ma
from metaadv.attacks import make
from metaadv.cli import main
from metaadv.engine.tensorboard import TensorBoardLogger, flat_hparams, log_report
from metaadv.eval.report import RobustnessReport
from metaadv.models import SmallCNN

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
plugin_data_pb2 = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=1)"]
TASKS = ["fgsm", "pgd_linf"]  # the task names of SPECS


def tiny_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(hidden=8)


def meta_config(steps: int, log_every: int = 1) -> ma.MetaConfig:
    """Both attack types in every meta-batch (2 tasks, no replacement): 32 examples a meta-step."""
    return ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=steps, log_every=log_every,
                         device="cpu", seed=1)  # fmt: skip


def meta_run(images, steps: int, **kwargs) -> ma.TrainResult:
    tasks = ma.AttackDistribution(SPECS, seed=1)
    return ma.meta_train(tiny_model(), images, tasks, meta_config(steps), progress=False, **kwargs)


def baseline_run(images, method: str, attacks: list[str], steps: int, log_every: int = 10, **kwargs) -> ma.TrainResult:
    loop = ma.LoopConfig(steps=steps, batch_size=16, lr=2e-3, device="cpu", log_every=log_every)
    return ma.train(method, tiny_model(), images, attacks, loop=loop, progress=False, **kwargs)


def events(directory: Path) -> EventAccumulator:
    """Everything TensorBoard shows for ``directory`` (all its event files, purges applied)."""
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def curve(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def steps_of(acc: EventAccumulator, tag: str) -> list[int]:
    return [step for step, _ in curve(acc, tag)]


def texts(acc: EventAccumulator, tag: str) -> list[str]:
    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")]


def logged_hparams(acc: EventAccumulator) -> dict[str, object]:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}


def next_second() -> None:
    """Event files are named by the second they were opened in, and read in name order: a resumed segment's
    file must sort after the first segment's, as it always does outside a test."""
    time.sleep(1.02 - time.time() % 1)


# --- what a run logs ----------------------------------------------------------------------------------------


def test_a_meta_run_logs_every_step_its_loss_and_each_tasks_query_curves(images, tmp_path):
    result = meta_run(images, 4, tensorboard=tmp_path / "tb")
    acc = events(tmp_path / "tb")
    for tag in ("loss", "grad_norm", "bad_steps", "lr", *(f"query_{k}/{t}" for k in ("acc", "loss") for t in TASKS)):
        assert steps_of(acc, tag) == [1, 2, 3, 4], tag
    history = result.history
    assert [v for _, v in curve(acc, "loss")] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [v for _, v in curve(acc, "grad_norm")] == pytest.approx([r["grad_norm"] for r in history], rel=1e-6)
    for task in TASKS:  # each meta-batch holds both types, in the order sampled
        logged = [v for _, v in curve(acc, f"query_acc/{task}")]
        assert logged == pytest.approx([r["query_acc"][r["task_names"].index(task)] for r in history], rel=1e-6)
    assert [v for _, v in curve(acc, "lr")] == pytest.approx([meta_config(4).outer_lr] * 4)
    assert [v for _, v in curve(acc, "bad_steps")] == [0, 0, 0, 0]
    tags = acc.Tags()["scalars"]
    assert not {"step", "epoch", "seconds", "skipped", "task_names", "task_specs"} & set(tags)


def test_a_meta_run_logs_its_config_as_text_and_as_hyper_parameters(images, tmp_path):
    meta_run(images, 2, tensorboard=tmp_path / "tb")
    acc = events(tmp_path / "tb")
    [text] = texts(acc, "config")
    config = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    assert config["method"] == "meta_train" and config["tasks"]["specs"] == [make(s).spec for s in SPECS]
    assert config["loop"] == {"batch_size": 32, "seed": 1, "n_examples": 64, "steps": 2}
    hparams = logged_hparams(acc)
    assert hparams["method"] == "meta_train" and hparams["model"] == "SmallCNN"
    assert hparams["meta.tasks_per_batch"] == 2
    assert hparams["meta.inner_lr"] == pytest.approx(config["meta"]["inner_lr"])
    assert json.loads(hparams["tasks.specs"]) == config["tasks"]["specs"]  # lists as their JSON text
    assert hparams["loop.batch_size"] == 32


def test_flat_hparams_joins_nested_keys_and_keeps_only_scalars_and_strings():
    flat = flat_hparams({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None, "g": True, "h": 0.5})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": "[1, 2]", "f": "null", "g": True, "h": 0.5}


def test_per_task_curves_average_repeated_task_names(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.start({"method": "test"}, 0)
    logger.step({"step": 1, "loss": 1.5, "task_names": ["fgsm", "fgsm", "pgd_linf"], "query_acc": [0.5, 1.0, 0.25],
                 "crafted": [True, False, True], "skipped": False, "seconds": 3.0}, [0.1, 0.01])  # fmt: skip
    logger.close()
    acc = events(tmp_path)
    assert curve(acc, "query_acc/fgsm") == [(1, 0.75)] and curve(acc, "query_acc/pgd_linf") == [(1, 0.25)]
    assert curve(acc, "lr") == [(1, pytest.approx(0.1))] and curve(acc, "lr/1") == [(1, pytest.approx(0.01))]
    assert set(acc.Tags()["scalars"]) == {"loss", "query_acc/fgsm", "query_acc/pgd_linf", "lr", "lr/1"}


def test_a_baseline_run_logs_loss_gradient_norm_bad_steps_and_learning_rate(images, tmp_path):
    result = baseline_run(images, "pgd_at", SPECS[1:], 3, log_every=1, tensorboard=tmp_path / "tb")
    acc = events(tmp_path / "tb")
    assert [v for _, v in curve(acc, "loss")] == pytest.approx([r["loss"] for r in result.history], rel=1e-6)
    assert [v for _, v in curve(acc, "grad_norm")] == pytest.approx([r["grad_norm"] for r in result.history], rel=1e-6)
    assert curve(acc, "lr") == [(s, pytest.approx(2e-3)) for s in (1, 2, 3)]
    assert curve(acc, "bad_steps") == [(1, 0), (2, 0), (3, 0)]
    assert logged_hparams(acc)["method"] == "pgd_at"


def test_a_run_logs_every_log_every_steps_and_the_last(images, tmp_path):
    baseline_run(images, "erm", [], 5, log_every=2, tensorboard=tmp_path / "tb")
    assert steps_of(events(tmp_path / "tb"), "loss") == [2, 4, 5]


def test_ramp_logs_its_gradient_projection_cosine(images, tmp_path):
    result = baseline_run(images, "ramp", SPECS, 2, log_every=1, tensorboard=tmp_path / "tb")
    assert [v for _, v in curve(events(tmp_path / "tb"), "gp_cos")] == pytest.approx(
        [r["gp_cos"] for r in result.history], rel=1e-6
    )


# --- resume and re-use of a directory ------------------------------------------------------------------------


def test_a_resumed_run_continues_the_curves_once_each_with_the_values_of_an_uninterrupted_run(images, tmp_path):
    straight = events_of_meta_run(images, tmp_path / "straight", 4)
    # A run that wrote step 3's events but was stopped before its step-3 checkpoint, resumed from step 2's.
    checkpoints, tb = tmp_path / "checkpoints", tmp_path / "resumed"
    meta_run(images, 3, checkpoint_dir=checkpoints, checkpoint_every=1, tensorboard=tb)
    assert steps_of(events(tb), "loss") == [1, 2, 3]
    step2 = checkpoints / "ckpt-00000002.pt"
    next_second()
    meta_run(images, 4, checkpoint_dir=checkpoints, checkpoint_every=1, resume=step2, tensorboard=tb)
    resumed = events(tb)
    for tag in ("loss", "grad_norm", "bad_steps", "lr", *(f"query_acc/{t}" for t in TASKS)):
        assert steps_of(resumed, tag) == [1, 2, 3, 4], tag  # step 3 once: the first run's was purged
        assert curve(resumed, tag) == curve(straight, tag), tag
    assert len(texts(resumed, "config")) == 1  # written by the first segment only


def events_of_meta_run(images, tb: Path, steps: int) -> EventAccumulator:
    meta_run(images, steps, tensorboard=tb)
    return events(tb)


def test_a_run_resumed_from_its_last_checkpoint_has_each_step_once(images, tmp_path):
    checkpoints, tb = tmp_path / "checkpoints", tmp_path / "tb"
    baseline_run(images, "erm", [], 2, log_every=1, checkpoint_dir=checkpoints, checkpoint_every=1, tensorboard=tb)
    next_second()
    baseline_run(images, "erm", [], 4, log_every=1, checkpoint_dir=checkpoints, checkpoint_every=1, resume=True,
                 tensorboard=tb)  # fmt: skip
    straight = baseline_run(images, "erm", [], 4, log_every=1, tensorboard=tmp_path / "straight")
    acc = events(tb)
    assert steps_of(acc, "loss") == [1, 2, 3, 4]
    assert [v for _, v in curve(acc, "loss")] == pytest.approx([r["loss"] for r in straight.history], rel=1e-6)


def test_a_fresh_run_in_a_used_directory_replaces_its_curves_and_warns(images, tmp_path, caplog):
    baseline_run(images, "erm", [], 3, log_every=1, tensorboard=tmp_path / "tb")
    next_second()
    with caplog.at_level(logging.WARNING, logger="metaadv.engine.tensorboard"):
        second = baseline_run(images, "pgd_at", SPECS[1:], 2, log_every=1, tensorboard=tmp_path / "tb")
    assert "holds events of an earlier run" in caplog.text
    acc = events(tmp_path / "tb")
    assert [v for _, v in curve(acc, "loss")] == pytest.approx([r["loss"] for r in second.history], rel=1e-6)
    assert steps_of(acc, "lr") == [1, 2]  # the first run's step 3 is gone too


# --- logging changes nothing --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pgd_at", "meta"])
def test_training_is_bitwise_the_same_with_and_without_tensorboard(images, tmp_path, method):
    if method == "meta":
        off, on = meta_run(images, 3), meta_run(images, 3, tensorboard=tmp_path / "tb")
    else:
        off = baseline_run(images, method, SPECS[1:], 3, log_every=1)
        on = baseline_run(images, method, SPECS[1:], 3, log_every=1, tensorboard=tmp_path / "tb")
    assert same_weights(off.model, on.model)
    assert [r["loss"] for r in off.history] == [r["loss"] for r in on.history]
    assert steps_of(events(tmp_path / "tb"), "loss")  # it did log


def test_only_rank_0_writes(images, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a torchrun worker (one process: no process group)
    baseline_run(images, "erm", [], 2, tensorboard=tmp_path / "tb")
    log_report(tmp_path / "tb", report(), step=2)
    assert not (tmp_path / "tb").exists()


# --- errors -----------------------------------------------------------------------------------------------------


def test_without_the_tensorboard_package_asking_for_it_says_how_to_install_it(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(ImportError, match="pip install tensorboard"):
        baseline_run(images, "erm", [], 1, tensorboard=tmp_path / "tb")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        meta_run(images, 1, tensorboard=tmp_path / "tb")
    baseline_run(images, "erm", [], 1)  # off: not needed


def test_a_tensorboard_that_is_not_a_directory_name_raises_type_error(images):
    with pytest.raises(TypeError, match="tensorboard must be a directory"):
        baseline_run(images, "erm", [], 1, tensorboard=1)


# --- evaluation reports and the CLI -------------------------------------------------------------------------


def report() -> RobustnessReport:
    return RobustnessReport(
        clean_acc=0.9, per_attack={SPECS[0]: 0.5, SPECS[1]: 0.25}, union_acc=0.2, n_examples=16,
        attacks=tuple(SPECS), adapt_shots=8, adapted={"finetune": {SPECS[0]: 0.75, SPECS[1]: 0.5}},
        adapted_union={"finetune": 0.375}, adapted_clean={"finetune": {SPECS[0]: 0.75, SPECS[1]: 0.875}},
    )  # fmt: skip


def test_log_report_writes_clean_per_attack_union_and_adapted_accuracies(tmp_path):
    log_report(tmp_path, report(), step=7)
    acc = events(tmp_path)
    expected = {"eval/clean": 0.9, f"eval/{SPECS[0]}": 0.5, f"eval/{SPECS[1]}": 0.25, "eval/union": 0.2,
                f"eval/finetune@8/{SPECS[0]}": 0.75, f"eval/finetune@8/{SPECS[1]}": 0.5,
                "eval/finetune@8/union": 0.375, "eval/finetune@8/clean": 0.8125}  # fmt: skip
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, value in expected.items():
        assert curve(acc, tag) == [(7, pytest.approx(value))], tag
    assert texts(acc, "eval/report") == [report().to_markdown()]


def test_log_report_appends_to_a_training_runs_directory(images, tmp_path):
    baseline_run(images, "erm", [], 2, log_every=1, tensorboard=tmp_path)
    next_second()
    log_report(tmp_path, report(), step=2)
    acc = events(tmp_path)
    assert steps_of(acc, "loss") == [1, 2] and steps_of(acc, "eval/union") == [2]


CONFIG = """\
tasks: {specs: ['fgsm(eps=0.3)', 'pgd_linf(eps=0.3, steps=1)']}
model: {name: SmallCNN, hidden: 8}
meta: {tasks_per_batch: 2, support_size: 4, query_size: 4, log_every: 1}
"""


def test_cli_train_tensorboard_writes_events_and_records_the_directory_in_config_json(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    out, tb = tmp_path / "run", tmp_path / "tb"
    args = ["train", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--steps", "2", "--quiet"]
    assert main([*args, "--tensorboard", str(tb)]) == 0
    acc = events(tb)
    assert steps_of(acc, "loss") == [1, 2] and steps_of(acc, "query_acc/fgsm") == [1, 2]
    assert json.loads((out / "config.json").read_text())["run"]["tensorboard"] == str(tb.resolve())


def test_cli_eval_of_a_logged_run_writes_its_report_beside_the_training_curves(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    out, tb = tmp_path / "run", tmp_path / "tb"
    train = ["train", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--steps", "2", "--quiet"]
    assert main([*train, "--tensorboard", str(tb)]) == 0
    next_second()
    assert main(["eval", "--checkpoint", str(out), "--attacks", "fgsm(eps=0.1)", "--n-examples", "16", "--quiet"]) == 0
    acc = events(tb)
    assert steps_of(acc, "loss") == [1, 2] and steps_of(acc, "eval/union") == [2]
    report = json.loads((out / "report.json").read_text())
    assert curve(acc, "eval/union")[0][1] == pytest.approx(report["union_acc"])


def test_the_readme_tensorboard_command_runs_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "--tensorboard" in ln and ln.startswith(".venv/bin/metaadv"))
    argv = shlex.split(line, comments=True)[1:]
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).parents[1]
    argv = [str(root / a) if a.startswith("configs/") else a for a in argv]
    assert main([*argv, "--steps", "2", "--quiet"]) == 0  # the README's run, for two meta-steps
    assert steps_of(events(tmp_path / "runs" / "tb" / "demo"), "loss") == [2]  # log_every 10: the last step
