"""benchmarks/verdict.py: the adaptation question answered from a results folder, seed by seed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import verdict  # noqa: E402

CONFIG = {"methods": ["pgd_at", "avg", "meta_so"], "train_attacks": ["a"], "pgd_at_attack": "a", "meta": {}}


def record(method, seed, zero_shot, best, matched=None, seconds=100.0):
    """A run whose held-out union and mean are ``zero_shot`` and whose best common adaptation at 8 shots is
    ``best`` (bn), with its matched adaptation where given."""
    at = {"adapted": {"bn": {"a": best}}, "adapted_union": {"bn": best}}
    if matched is not None:
        at["adapted"]["matched"], at["adapted_union"]["matched"] = {"a": matched}, matched
    return {"method": method, "seed": seed, "config": CONFIG, "train_seconds": seconds, "adapted": {"8": at},
            "heldout": {"per_attack": {"a": zero_shot}, "union_acc": zero_shot, "clean_acc": 0.98}}  # fmt: skip


RECORDS = [
    record("pgd_at", 0, 0.60, 0.62), record("pgd_at", 1, 0.58, 0.61),
    record("avg", 0, 0.70, 0.70, seconds=200.0), record("avg", 1, 0.72, 0.72, seconds=200.0),
    record("meta_so", 0, 0.71, 0.90, matched=0.75), record("meta_so", 1, 0.70, 0.90, matched=0.74),
]  # fmt: skip


def test_the_meta_method_is_judged_by_its_own_inner_loop_against_the_best_baselines_best_adaptation():
    (row,) = verdict.leads(RECORDS, 8, "union")
    assert row["baseline"] == "avg"  # the highest mean best@8 of the baselines
    assert row["scores"] == {0: 0.75, 1: 0.74}  # matched, not its best common adaptation (0.90)
    assert {s: round(v, 6) for s, v in row["leads"].items()} == {0: 5.0, 1: 2.0}
    assert row["time_ratio"] == 0.5


def test_a_win_needs_the_margin_on_every_seed_and_zero_shot_compares_the_held_out_scores():
    table = verdict.verdict_table(RECORDS, margin=3.0)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table.splitlines()[2:8]}
    assert "+5.0, +2.0" in rows[("8", "union")] and "| 3.5 ± 2.1 | no |" in rows[("8", "union")]
    assert "| yes |" in verdict.verdict_table(RECORDS, margin=2.0).splitlines()[4]  # 8 shots, union: both >= 2
    assert "+1.0, -2.0" in rows[("zero-shot", "union")]  # meta_so 71/70 against avg 70/72
    assert "avg 71.0 ± 1.4" in rows[("zero-shot", "mean")]


def test_a_baseline_competes_only_once_it_has_run_every_seed_of_the_meta_method():
    partial = [*RECORDS, record("msd", 0, 0.99, 0.99)]  # the best of all, but on seed 0 only
    (row,) = verdict.leads(partial, 8, "union")
    assert row["baseline"] == "avg" and set(row["leads"]) == {0, 1}
    assert "Missing seeds (a baseline competes once it covers the meta method's): msd (seeds [0])." in (
        verdict.verdict_table(partial)
    )
    (row,) = verdict.leads([r for r in partial if r["seed"] == 0], 8, "union")  # every run on seed 0 alone
    assert row["baseline"] == "msd"


def test_the_results_table_gives_every_method_mean_and_std_over_seeds_and_no_matched_score_to_a_baseline():
    rows = {line.split("|")[1].strip(): line for line in verdict.results_table(RECORDS).splitlines()[2:]}
    assert list(rows) == ["`pgd_at`", "`avg`", "`meta_so`"]
    cells = [c.strip() for c in rows["`meta_so`"].strip("|").split("|")]
    assert cells[1:3] == ["2", "98.0 ± 0.0"]  # seeds, clean
    assert cells[3] == "70.5 ± 0.7 / 70.5 ± 0.7"  # zero-shot union / mean
    assert cells[5:7] == ["90.0 ± 0.0 / 90.0 ± 0.0", "74.5 ± 0.7 / 74.5 ± 0.7"]  # best@8, matched@8
    assert cells[4] == "–"  # no reference attacks ran
    assert [c.strip() for c in rows["`avg`"].strip("|").split("|")][6:] == ["–", "200 ± 0"]


def test_the_committed_verdict_is_the_answer_of_the_committed_converged_runs():
    """benchmarks/results/verdict.md, which docs/adaptation.md quotes, is what verdict.py writes from the JSON."""
    expected = f"{verdict.HEADER}\n{verdict.answer(verdict.converged_folders())}"
    assert verdict.VERDICT.read_text() == expected, "python benchmarks/verdict.py --out benchmarks/results/verdict.md"
    assert "## converged_leave_out_l2" in expected
