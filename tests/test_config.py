"""MetaConfig and the run-config loader: validated fields, errors that name the field, fuzzed inputs."""

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from metaadv import MetaConfig, RunConfig, load_run_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tasks_per_batch", 0),
        ("support_size", -1),
        ("query_size", 2.5),
        ("inner_steps", -1),
        ("inner_lr", 0.0),
        ("outer_lr", float("nan")),
        ("clean_weight", 1.5),
        ("first_order", "yes"),
        ("query_attack", "target"),
        ("outer_optimizer", "lbfgs"),
        ("epochs", True),
        ("steps", 0),
    ],
)
def test_invalid_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"MetaConfig.{field}"):
        MetaConfig(**{field: value})


def test_unknown_options_are_rejected_by_name():
    with pytest.raises(ValueError, match="inner_stepz"):
        MetaConfig.from_dict({"inner_stepz": 2})


def test_examples_per_step():
    assert MetaConfig(tasks_per_batch=3, support_size=10, query_size=6).examples_per_step == 48


def test_run_config_round_trips_through_yaml_and_json(tmp_path):
    values = {
        "data": "mnist5k",
        "model": {"name": "SmallCNN", "batch_norm": True},
        "tasks": {"specs": ["fgsm(eps=0.3)"]},
        "meta": {"inner_steps": 2, "epochs": 1},
        "eval": {"attacks": ["pgd_l2(eps=2.0)"]},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "a.json").write_text(json.dumps(values))
    a, b = load_run_config(tmp_path / "a.yaml"), load_run_config(tmp_path / "a.json")
    assert a == b and a.meta.inner_steps == 2
    assert RunConfig.from_dict(a.to_dict()) == a
    assert load_run_config(tmp_path / "a.yaml", {"epochs": 5}).meta.epochs == 5


def test_shipped_configs_load():
    names = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert len(names) >= 3
    for name in names:
        cfg = load_run_config(name)
        assert cfg.tasks["specs"], name


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("meta: [1, 2]", "mapping"),
        ("tasks: {specs: []}", "tasks.specs"),
        ("tasks: {specs: [fgsm]}\nextra: 1", "unknown top-level"),
        ("tasks: {specs: [fgsm], sped: 1}", "unknown tasks"),
        ("- 1\n- 2", "top level"),
        ("tasks: {specs: [fgsm]\n", "YAML"),
    ],
)
def test_malformed_config_files_raise_value_errors(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, TypeError), match=match):
        load_run_config(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
meta_keys = st.sampled_from(["inner_steps", "inner_lr", "epochs", "first_order", "query_attack", "bogus"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(meta_keys, json_values, max_size=4))
def test_fuzzed_meta_sections_only_raise_documented_errors(values):
    with contextlib.suppress(ValueError, TypeError):
        MetaConfig.from_dict(values)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_fuzzed_config_files_only_raise_documented_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    with contextlib.suppress(ValueError, TypeError):
        load_run_config(path)
