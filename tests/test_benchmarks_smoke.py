"""Smoke test of the held-out benchmark pipeline on a tiny budget: protocol -> training -> evaluation ->
JSON -> summary table -> figures. The real runs live in benchmarks/ (see docs/benchmarks.md)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout  # noqa: E402
import plots  # noqa: E402

TINY = {
    "epochs": 1, "train_examples": 256, "n_examples": 24, "sanity_examples": 16, "shots": [4],
    "model": {"name": "SmallCNN", "hidden": 32},
    "held_out": ["pgd_l2(eps=2.0, steps=3)", "torchattacks:PGDL2(eps=2.0, alpha=0.5, steps=3)"],
    "eps_sweep": {"pgd_linf": [0.1, 0.3]}, "black_box": "torchattacks:Square(eps=0.3, n_queries=20)",
    "meta": {"tasks_per_batch": 2, "support_size": 16, "query_size": 16},
    "train_attacks": ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], "pgd_at_attack": "pgd_linf(eps=0.3, steps=2)",
}  # fmt: skip


@pytest.mark.slow
def test_heldout_pipeline_writes_results_summary_and_figures(tmp_path):
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY}
    records = [heldout.run_one(m, protocol, 0, "cpu", tmp_path) for m in ("erm", "pgd_at", "meta_so")]
    saved = json.loads((tmp_path / "meta_so_seed0.json").read_text())
    assert saved["method"] == "meta_so" and saved["heldout"]["attacks"] == records[2]["heldout"]["attacks"]
    assert set(saved["adapted"]["4"]["adapted_union"]) == {"sgd", "bn"}
    assert saved["history"] and "versions" in saved and "git_commit" in saved
    sweep = saved["sanity"]["eps_sweep"]["pgd_linf"]["acc"]
    assert len(sweep) == 2 and all(0 <= a <= 1 for a in sweep)

    table = heldout.summarize(records)
    assert all(m in table for m in ("erm", "pgd_at", "meta_so")) and "held-out union" in table
    assert [r["method"] for r in heldout.load_records(tmp_path)] == ["erm", "pgd_at", "meta_so"]  # protocol order

    written = plots.plot_folder(tmp_path, tmp_path / "figures")
    kinds = {p.stem.removeprefix(tmp_path.name + "_") for p in written}
    assert {"heldout", "eps", "cost", "fewshot", "meta_so_training"} <= kinds
    assert all(p.stat().st_size > 5000 for p in written)


def test_every_shipped_protocol_loads_and_names_valid_attacks():
    for path in sorted((ROOT / "benchmarks" / "protocols").glob("*.yaml")):
        protocol = heldout.load_protocol(path, quick=False)
        assert protocol["held_out"] and protocol["methods"], path.name
        assert not set(protocol["train_attacks"]) & set(protocol["held_out"]), (
            f"{path.name}: held-out attack trained on"
        )


def test_committed_full_results_cover_three_seeds_and_pass_the_sanity_checks():
    """The numbers in docs/benchmarks.md come from these files."""
    for name in ("linf_heldout", "leave_out_linf", "leave_out_l2", "leave_out_l1"):
        records = heldout.load_records(ROOT / "benchmarks" / "results" / name)
        methods = records[0]["config"]["methods"]
        assert {(r["method"], r["seed"]) for r in records} == {(m, s) for m in methods for s in (0, 1, 2)}, name
        for r in records:
            assert r["sanity"]["warnings"] == [] and r["sanity"]["unbounded_acc"] <= 0.05, (name, r["method"])
            assert r["heldout"]["n_examples"] == 500 and set(r["adapted"]) == {"8", "32", "128"}
