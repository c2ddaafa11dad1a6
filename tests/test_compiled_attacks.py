"""Attacks under torch.compile / CUDA graphs (metaadv/attacks/compiled.py): equal to eager, recompiles bounded,
functional parameters as graph inputs, graph breaks, the eager fallback, cudagraphs refused on CPU, the option
in meta-training, and benchmarks/gpu.sh's plan. Fast tests compile with the ``aot_eager`` backend (TorchDynamo
and AOTAutograd, no code generation); Inductor itself is tested in the ``slow`` and ``gpu`` tests."""

from __future__ import annotations

import dataclasses
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import metaadv as ma
from metaadv.attacks import compiled
from metaadv.attacks.compiled import MODES, compiled_attacks, current_mode
from metaadv.attacks.spec import run_grouped
from metaadv.functional import model_fn, state
from metaadv.meta import meta_batch_loss
from metaadv.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["pgd_linf(eps=0.3, steps=3)", "pgd_l2(eps=2.0, steps=2)", "mifgsm(eps=0.3, steps=2)", "fgsm(eps=0.3)"]


@pytest.fixture
def fresh(monkeypatch):
    """A fresh compile state whose "compile" mode uses ``backend``, default ``aot_eager`` (seconds, no codegen)."""

    def use(backend: object = "aot_eager") -> None:
        monkeypatch.setitem(compiled._OPTIONS, "compile", {} if backend == "inductor" else {"backend": backend})

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled, "_FAILED", set())
    use()
    yield use
    torch._dynamo.reset()


def _setup(n: int = 8, hidden: int = 8, seed: int = 0) -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return SmallCNN(hidden=hidden).train(), torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))


def _both(attack: ma.attacks.Attack, target, x: torch.Tensor, y: torch.Tensor, mode: str = "compile"):
    """(eager, compiled) adversarial examples from the same random start."""
    torch.manual_seed(1)
    eager = run_grouped([attack], target, [x], [y])[0]
    torch.manual_seed(1)
    with compiled_attacks(mode):
        fast = run_grouped([attack], target, [x], [y])[0]
    return eager, fast


def test_the_mode_is_scoped_to_the_block_and_validated():
    assert current_mode() == "off"
    with compiled_attacks("compile"):
        assert current_mode() == "compile"
        with compiled_attacks("off"):
            assert current_mode() == "off"
        assert current_mode() == "compile"
    assert current_mode() == "off"
    with pytest.raises(ValueError, match="compile mode must be one of"), compiled_attacks("fast"):
        pass
    assert all(ma.MetaConfig(compile_attacks=m).compile_attacks == m for m in MODES)
    for bad in ("on", True, None):
        with pytest.raises(ValueError, match="compile_attacks"):
            ma.MetaConfig(compile_attacks=bad)


@pytest.mark.parametrize("spec", SPECS)
def test_compiled_attacks_equal_eager_on_functional_params_in_training_mode(fresh, spec):
    model, x, y = _setup()
    params, buffers = state(model)
    eager, fast = _both(ma.attacks.make(spec), model_fn(model, params, buffers), x, y)
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-6)


def test_new_parameter_values_reuse_the_graph_and_new_batch_sizes_recompile_once(fresh):
    """Params are graph inputs (not constants): after an update the compiled attack follows them. The first
    batch size compiles static, the second recompiles with a dynamic batch, later sizes reuse that graph."""
    model, _, _ = _setup()
    params, buffers = state(model)
    attack = ma.attacks.make("pgd_linf(eps=0.3, steps=2)")
    for n in (16, 16, 24, 40, 16):  # on CPU, conv2d specializes batches below 16 apart
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # in place, as the meta-optimizer updates them
        x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
        eager, fast = _both(attack, model_fn(model, params, buffers), x, y)  # a new closure every call
        torch.testing.assert_close(fast, eager, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2


def test_a_graph_break_in_the_model_still_gives_the_eager_result(fresh):
    model, x, y = _setup()
    model.eval()

    def reads_the_host(images: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return logits * 2 if float(logits.detach().abs().max()) > 0 else logits  # a host read: a graph break

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        eager, fast = _both(ma.attacks.make("pgd_linf(eps=0.3, steps=2)"), reads_the_host, x, y)
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-6)
    assert counters["graph_break"]


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(fresh):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    fresh(broken)
    model, x, y = _setup()
    attack, target = ma.attacks.make("pgd_linf(eps=0.3, steps=2)"), model.eval()
    with pytest.warns(RuntimeWarning, match=r"compile_attacks='compile'.*eagerly") as record:
        eager, fast = _both(attack, target, x, y)
        _both(attack, target, x, y)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(fast, eager, rtol=0, atol=0)
    assert "compile" in compiled._FAILED


def test_cudagraphs_on_cpu_is_a_clear_error(fresh):
    model, x, y = _setup()
    with compiled_attacks("cudagraphs"), pytest.raises(RuntimeError, match=r"needs CUDA tensors.*use 'compile'"):
        ma.attacks.make("fgsm(eps=0.3)")(model.eval(), x, y)


def test_meta_training_with_compiled_attacks_gives_the_eager_meta_gradient(fresh):
    """``MetaConfig(compile_attacks=...)`` reaches the attacks of a meta-step (``attack_precision``): the looped
    step's attacks run compiled, and both steps' meta-gradients equal the eager ones. The batched step's attack
    model (``meta.batched.task_model_fn``: vmap under a TorchFunctionMode) is not traced by TorchDynamo in
    torch 2.13, which runs it eagerly itself (``AttributeError('batch_stats')`` while tracing)."""
    model, x, y = _setup(n=2 * (4 + 4))
    params, buffers = state(model)
    tasks = ma.AttackDistribution(["pgd_linf(eps=0.3, steps=2)", "pgd_l2(eps=2.0, steps=2)"], seed=0).sample(2)
    for batched in (False, True):
        base = ma.MetaConfig(tasks_per_batch=2, support_size=4, query_size=4, batched=batched)
        grads, graphs = [], []
        for mode in ("off", "compile"):
            counters.clear()
            torch.manual_seed(2)
            cfg = dataclasses.replace(base, compile_attacks=mode)
            loss = meta_batch_loss(model, params, buffers, tasks, x, y, cfg).loss
            grads.append(torch.autograd.grad(loss, list(params.values())))
            graphs.append(counters["stats"]["unique_graphs"])
        for g_eager, g_fast in zip(*grads, strict=True):
            torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-6)
        if not batched:
            assert graphs == [0, 1]  # the looped step's attacks did run compiled


@pytest.mark.slow
def test_inductor_compiled_attacks_equal_eager_on_cpu(fresh):
    """Real code generation (C++ on CPU, about a minute here on 2 cores)."""
    fresh("inductor")
    model, x, y = _setup()
    params, buffers = state(model)
    for spec in ("pgd_linf(eps=0.3, steps=3)", "mifgsm(eps=0.3, steps=2)"):
        eager, fast = _both(ma.attacks.make(spec), model_fn(model, params, buffers), x, y)
        torch.testing.assert_close(fast, eager, rtol=0, atol=1e-5)
    assert not compiled._FAILED


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["compile", "cudagraphs"])
def test_compiled_and_cuda_graph_attacks_equal_eager_on_cuda(fresh, mode):
    """Inductor on CUDA; cudagraphs replays the recorded step: equal to eager within float tolerance, also for a
    second batch of the same shape (replay) and for new parameter values."""
    fresh("inductor")
    model, x, y = _setup(n=64, hidden=64)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    params, buffers = state(model)
    attack = ma.attacks.make("pgd_linf(eps=0.3, steps=5)")
    for _ in range(3):
        eager, fast = _both(attack, model_fn(model, params, buffers), x, y, mode=mode)
        torch.testing.assert_close(fast, eager, rtol=0, atol=1e-4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x = torch.rand_like(x)
    assert not compiled._FAILED


def test_gpu_script_parses_and_its_dry_run_prints_the_plan(tmp_path):
    script = ROOT / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "out")], check=True, cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "make .venv/.installed" in out and "pytest" in out and "-m gpu" in out
    assert "speed.py --device cuda" in out and "--compile" in out and "op_count.py" in out
    assert out.count("timeout ") >= 4 and str(tmp_path / "out") in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_the_speed_benchmarks_compile_rows_time_eager_beside_compiled(fresh):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    rows = speed.compile_rows(torch.device("cpu"), 8, (1, 2), repeats=1)
    assert [(r["examples"], r["attack_steps"]) for r in rows] == [(8, 1), (8, 2)]
    assert all(r["eager_seconds"] > 0 and r["compile_seconds"] > 0 and r["compile_graphs"] == 1 for r in rows)
    assert "cudagraphs_seconds" not in rows[0]  # CUDA only
