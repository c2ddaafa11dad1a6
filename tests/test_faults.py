"""Numerical faults and bad input: an injected NaN never reaches the meta-parameters (the step is skipped,
counted and logged; too many in a row stop training), and mistakes at the API boundary raise errors that
name the argument, the value and what is allowed instead of failing deep inside torch."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import Poisonable, PoisonedTasks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset

import metaadv as ma
from metaadv import cli
from metaadv.attacks import registry
from metaadv.data import TensorDataset
from metaadv.engine import NonFiniteLossError, training_tensors
from metaadv.models import SmallCNN

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"]


def data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def poisoned_run(steps: int, bad: set[int], specs: list[str] = SPECS, **config):
    """meta_train a fresh seeded Poisonable for ``steps`` meta-steps; the steps in ``bad`` (1-based) see NaN."""
    torch.manual_seed(0)
    model = Poisonable()
    values = {"tasks_per_batch": 1, "support_size": 8, "query_size": 8, "sample_replace": True, "steps": steps}
    cfg = ma.MetaConfig(**{**values, **config})
    try:
        result = ma.meta_train(model, data(), PoisonedTasks(specs, model, bad, seed=0), cfg, progress=False)
    finally:
        model.poison = False
    return model, result


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nan_steps_are_skipped_counted_and_logged_without_touching_the_model(caplog):
    clean, _ = poisoned_run(steps=1, bad=set())
    with caplog.at_level(logging.WARNING, logger="metaadv.engine.loop"):
        model, result = poisoned_run(steps=3, bad={2, 3})
    # Steps 2 and 3 saw NaN everywhere: parameters, BatchNorm statistics and all are those after step 1.
    after = snapshot(model)
    for name, tensor in snapshot(clean).items():
        assert torch.equal(after[name], tensor), name
    assert all(bool(torch.isfinite(t).all()) for t in after.values() if t.is_floating_point())
    records = result.history
    assert [r["skipped"] for r in records] == [False, True, True]
    assert [r["bad_steps"] for r in records] == [0, 1, 2]
    assert records[0]["grad_norm"] > 0 and records[1]["loss"] != records[1]["loss"]  # NaN recorded as is
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 2: non-finite" in m and "update skipped" in m and "2 in total" not in m for m in messages)
    assert any("step 3: non-finite" in m and "2 in a row, 2 in total" in m for m in messages)


def test_a_skipped_step_undoes_the_persistent_generators_training_too():
    specs, options = ["generator(eps=0.3, steps=2)"], {"persistent_generator": True}
    _, clean = poisoned_run(steps=1, bad=set(), specs=specs, **options)
    _, result = poisoned_run(steps=2, bad={2}, specs=specs, **options)
    assert [r["skipped"] for r in result.history] == [False, True]
    after, expected = (r.generators.state_dict()["0"]["net"] for r in (result, clean))
    assert all(bool(torch.isfinite(t).all()) for t in after.values())  # the NaN step trained it on NaN
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name


def test_a_nan_step_under_task_attention_is_skipped_without_a_read_from_the_device():
    # the attention network sees NaN statistics: they are zeroed for it and turn the objective NaN
    clean, _ = poisoned_run(steps=1, bad=set(), task_attention=True)
    model, result = poisoned_run(steps=2, bad={2}, task_attention=True)
    assert [r["skipped"] for r in result.history] == [False, True]
    for name, tensor in snapshot(clean).items():
        assert torch.equal(snapshot(model)[name], tensor), name


def test_a_nan_gradient_with_a_finite_loss_is_skipped_too():
    torch.manual_seed(0)
    model = SmallCNN(hidden=16)
    before = snapshot(model)
    weight = model.head[-1].weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    # inner_steps=0: the hook fires only in the outer backward (an inner step would carry the NaN into the loss)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=8, query_size=8, inner_steps=0, max_bad_steps=2)
    with pytest.raises(NonFiniteLossError) as info:  # every step is bad: stop after 2
        ma.meta_train(model, data(), ma.AttackDistribution(SPECS, seed=0), cfg, progress=False)
    assert all(r["skipped"] and r["loss"] == r["loss"] for r in info.value.history)  # finite loss, NaN gradient
    after = snapshot(model)
    for name in before:  # the parameters never moved; BatchNorm statistics were put back after each step
        assert torch.equal(after[name], before[name]), name


def test_too_many_consecutive_bad_steps_stop_with_a_clear_error():
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*\(max_bad_steps=3\)") as info:
        poisoned_run(steps=10, bad=set(range(2, 11)), max_bad_steps=3)
    assert "parameters after step 1" in str(info.value) and "outer_lr" in str(info.value)
    assert [r["step"] for r in info.value.history] == [1, 2, 3, 4]
    assert isinstance(info.value, FloatingPointError)


def test_a_window_with_a_bad_step_is_replayed_into_the_run_checked_at_every_step():
    # log_every=4: the engine reads steps 1-4 from the device once, at step 4; step 3 was bad, so the window is
    # rolled back to its start and replayed checked. The run equals the one that read every step.
    (checked, every), (deferred, windowed) = (poisoned_run(steps=6, bad={3}, log_every=n) for n in (1, 4))
    assert [r["skipped"] for r in windowed.history] == [False, False, True, False, False, False]
    for name, tensor in snapshot(checked).items():
        assert torch.equal(snapshot(deferred)[name], tensor), name

    def without_time(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert repr(without_time(windowed.history)) == repr(without_time(every.history))  # NaN == NaN as text


def test_isolated_bad_steps_do_not_stop_training():
    _, result = poisoned_run(steps=6, bad={2, 4, 6}, max_bad_steps=2)
    assert len(result.history) == 6 and result.history[-1]["bad_steps"] == 3


def test_the_cli_reports_a_diverged_run_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the attack below is this test's only

    @ma.attacks.register("nan_images", norm=None)
    def nan_images(model_fn, x, y):
        """Adversarial examples that are all NaN: every meta-step's loss is NaN."""
        return x * float("nan")

    config = tmp_path / "run.yaml"
    meta = "{tasks_per_batch: 1, support_size: 4, query_size: 4, max_bad_steps: 2, device: cpu}"
    config.write_text(f"tasks: {{specs: ['nan_images']}}\nmodel: {{name: SmallCNN, hidden: 8}}\nmeta: {meta}\n")
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err


# --- bad input at the API boundary ----------------------------------------------------------------


class Shaped(nn.Module):
    """A model that returns whatever ``out(x)`` gives."""

    def __init__(self, out) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.out = out

    def forward(self, x):
        return self.out(x)


class EmptyDataset(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def meta(model, train, **kw):
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=1, sample_replace=True)
    return ma.meta_train(model, train, ma.AttackDistribution(["fgsm(eps=0.3)"]), cfg, progress=False, **kw)


@pytest.mark.parametrize(
    ("train", "error", "match"),
    [
        ((torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
        (EmptyDataset(), ValueError, "empty"),
        ((torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)), ValueError, "needs 8 examples"),
        ((torch.rand(16, 28, 28), torch.zeros(16, dtype=torch.long)), ValueError, r"\(B, C, H, W\)"),
        (((torch.rand(16, 1, 28, 28) * 255).byte(), torch.zeros(16, dtype=torch.long)), TypeError, "floating"),
        ((torch.rand(16, 1, 28, 28), torch.zeros(16)), TypeError, "integer tensor"),
        ((torch.rand(16, 1, 28, 28), torch.zeros(15, dtype=torch.long)), ValueError, r"shape \(16,\)"),
        ((torch.rand(16, 1, 28, 28), -torch.ones(16, dtype=torch.long)), ValueError, "negative label"),
        ((torch.rand(16, 1, 28, 28).double() * 2, torch.zeros(16, dtype=torch.long)), ValueError, r"\[0, 1\]"),
        ([(torch.rand(1, 28, 28), 0)] * 16, TypeError, "Dataset or an"),
    ],
)
def test_bad_datasets_are_named(train, error, match):
    with pytest.raises(error, match=match):
        meta(SmallCNN(hidden=8), train)


def test_an_empty_tensor_dataset_cannot_be_built():
    with pytest.raises(ValueError, match="at least one example"):
        TensorDataset(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (lambda x: torch.zeros(len(x)), r"logits of shape \(2, num_classes\), got \(2,\)"),
        (lambda x: torch.zeros(len(x), 10, 1), r"got \(2, 10, 1\)"),
        (lambda x: torch.zeros(1, 10), r"got \(1, 10\)"),
        (lambda x: (torch.zeros(len(x), 10),), "got tuple"),
        (lambda x: torch.zeros(len(x), 1), "num_classes >= 2"),
    ],
)
def test_a_model_whose_output_is_not_batch_by_classes_is_refused(out, match):
    x, y = data(16)
    with pytest.raises(ValueError, match=match):
        meta(Shaped(out), (x, y))


def test_a_model_that_fails_on_the_images_is_reported_without_torch_internals():
    x, y = data(16)
    with pytest.raises(ValueError, match=r"model failed on a batch of training images of shape \(2, 1, 28, 28\)"):
        meta(SmallCNN(in_channels=3, hidden=8), (x, y))  # an RGB model on grey digits
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        meta(SmallCNN(hidden=8).double(), (x, y))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1, got 0"),
        ({"checkpoint_dir": "x", "keep_last": 0}, "keep_last must be an integer >= 1, got 0"),
        ({"resume": True}, "resume=True needs checkpoint_dir"),
        ({"resume": 3}, "resume must be"),
    ],
)
def test_bad_checkpoint_options_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        meta(SmallCNN(hidden=8), data(16), **kwargs)


@pytest.mark.parametrize(("field", "value"), [("max_bad_steps", 0), ("max_bad_steps", 1.5), ("deterministic", "yes")])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=f"MetaConfig.{field} must be .*, got {value!r}"):
        ma.MetaConfig(**{field: value})


def test_deterministic_mode_restores_the_global_flags():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    x, y = data(16)
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=4, query_size=4, steps=1, deterministic=True)
    ma.meta_train(SmallCNN(hidden=8), (x, y), ma.AttackDistribution(["fgsm(eps=0.3)"]), cfg, progress=False)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_images_with_an_empty_dimension_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\(16, 1, 0, 28\)"):
        meta(SmallCNN(hidden=8), (torch.rand(16, 1, 0, 28), torch.zeros(16, dtype=torch.long)))


dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64, torch.bool])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=5) | st.just([3, 1, 28, 28])
fills = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0])


@settings(max_examples=120, deadline=None)
@given(shapes, dtypes, fills, st.lists(st.integers(0, 4), max_size=2), st.sampled_from([torch.int64, torch.float32]))
def test_fuzzed_training_data_only_raise_documented_errors(shape, dtype, fill, label_shape, label_dtype):
    """Any images/labels reach training only if valid; otherwise ValueError or TypeError, never a torch error."""
    try:
        x = torch.full(shape, fill).to(dtype)
    except (OverflowError, RuntimeError):  # values the dtype cannot hold: no such tensor to pass
        return
    y = torch.zeros(label_shape, dtype=label_dtype)
    model = SmallCNN(hidden=4)
    with contextlib.suppress(ValueError, TypeError):
        training_tensors(model, (x, y), torch.device("cpu"))


all_meta_fields = st.sampled_from([*ma.MetaConfig.__dataclass_fields__, "max_bad_stepz"])
values = st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=6) | st.lists(st.none())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(all_meta_fields, values, max_size=5))
def test_fuzzed_meta_configs_over_every_field_only_raise_documented_errors(fields):
    with contextlib.suppress(ValueError, TypeError):
        ma.MetaConfig.from_dict(fields)


def test_sets_crafted_in_a_skipped_step_are_not_reused():
    # Step 1 is NaN and skipped: its sets must not enter the reuse pool, so step 2 crafts afresh.
    _, result = poisoned_run(steps=4, bad={1}, specs=["fgsm(eps=0.3)"], reuse_every=3)
    assert [r["skipped"] for r in result.history] == [True, False, False, False]
    assert [r["crafted"] for r in result.history] == [[True], [True], [False], [False]]


def test_the_model_is_back_in_eval_mode_when_training_raises():
    torch.manual_seed(0)
    model = Poisonable()
    cfg = ma.MetaConfig(tasks_per_batch=1, support_size=8, query_size=8, steps=4, max_bad_steps=1)
    with pytest.raises(NonFiniteLossError):
        ma.meta_train(model, data(), PoisonedTasks(SPECS, model, {2}, seed=0), cfg, progress=False)
    assert not any(m.training for m in model.modules())
