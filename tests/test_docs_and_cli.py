"""The docs match the code: the README example runs as written, docs/api.md is current, the CLI works."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaadv.cli import main
from metaadv.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_block(), "README.md", "exec"), namespace)
    report = namespace["report"]
    assert (tmp_path / "robustness.png").stat().st_size > 0
    assert report.clean_acc > 0.5
    assert set(report.adapted["sgd"]) == set(report.per_attack)


def test_api_reference_is_generated_from_the_current_docstrings():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_api
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render(), "run: python docs/gen_api.py"


def cli_train(tmp_path: Path, config: str, name: str = "run") -> Path:
    """``metaadv train`` for 2 meta-steps with ``config`` (YAML text) written to tmp_path/run.yaml; the run dir."""
    path, out = tmp_path / "run.yaml", tmp_path / name
    path.write_text(config)
    assert main(["train", "--config", str(path), "--out", str(out), "--steps", "2", "--quiet"]) == 0
    return out


def test_cli_trains_then_evaluates_a_run_directory(tmp_path, capsys):
    out = cli_train(
        tmp_path,
        "tasks: {specs: ['fgsm(eps=0.3)']}\n"
        "model: {name: SmallCNN, hidden: 32}\n"
        "meta: {tasks_per_batch: 1, support_size: 8, query_size: 8}\n"
        "eval: {attacks: ['fgsm(eps=0.1)'], n_examples: 20}\n",
    )
    assert {p.name for p in out.iterdir()} >= {"model.pt", "config.json", "history.jsonl"}
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    assert main(["eval", "--checkpoint", str(out), "--quiet"]) == 0
    assert "fgsm(eps=0.1)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["n_examples"] == 20


def test_cli_run_directory_keeps_the_adaptation_state_and_eval_adapts_with_it(tmp_path):
    out = cli_train(
        tmp_path,
        "tasks: {specs: ['fgsm(eps=0.3)', 'noise(eps=0.3)']}\n"
        "model: {name: SmallCNN, hidden: 16}\n"
        "meta: {tasks_per_batch: 2, support_size: 8, query_size: 8, inner_steps: 2, learn_inner_lr: true,\n"
        "       task_bn: true, per_step_bn: true}\n"
        "eval: {attacks: ['fgsm(eps=0.1)'], n_examples: 16, adapt_shots: 8, adapt_steps: 1,\n"
        "       adapt_methods: [sgd, task_bn]}\n",
    )
    _, model, options = load_run(out)
    assert all(not torch.allclose(lr, torch.full_like(lr, 0.01)) for lr in options["adapt_lr"].values())  # learned
    assert options["task_bn"].names == ["fgsm", "noise"]
    mean = next(k for k in options["task_bn"].stats[0] if k.endswith("running_mean"))
    assert not torch.equal(options["task_bn"].stats[0][mean], options["task_bn"].stats[1][mean])
    assert not torch.equal(options["task_bn"].stats[0][mean], dict(model.named_buffers())[mean])
    assert options["step_bn"].steps == 2
    assert main(["eval", "--checkpoint", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["task_bn_types"]["fgsm(eps=0.1)"] in options["task_bn"].names
    assert set(report["adapted"]) == {"sgd", "task_bn"}


def test_cli_runs_with_the_same_config_give_the_same_weights(tmp_path):
    config = (
        "tasks: {specs: ['fgsm(eps=0.3)']}\nmodel: {name: SmallCNN, hidden: 16}\n"
        "meta: {tasks_per_batch: 1, support_size: 8, query_size: 8, seed: 3}\n"
    )
    for name in ("a", "b"):
        cli_train(tmp_path, config, name)
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reports_user_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {specs: ['pgd_linf(eps=-1)']}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "metaadv.cli", "train", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "eps" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_methods_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert namespace["avg"].history[-1]["step"] == 10
