"""``metaadv compare`` and ``eval.compare``: several runs on one evaluation setting, side by side, with a sentence
that calls a tie a tie."""

import json

import pytest

from metaadv import RobustnessReport
from metaadv.cli import main
from metaadv.eval.compare import comparison_summary, comparison_table

ATTACKS = ("fgsm(eps=0.3)", "pgd_l2(eps=2.0, steps=20)")


def report(union: float, adapted_union: float, n: int = 200, attacks=ATTACKS) -> RobustnessReport:
    return RobustnessReport(
        clean_acc=0.9, per_attack={a: union + 0.1 for a in attacks}, union_acc=union, n_examples=n,
        attacks=tuple(attacks), adapt_shots=32, adapted={"bn": {a: adapted_union for a in attacks}},
        adapted_union={"bn": adapted_union}, adapted_clean={"bn": {a: 0.9 for a in attacks}},
    )  # fmt: skip


def test_the_table_has_a_row_per_model_and_the_union_before_and_after_adaptation():
    table = comparison_table({"meta": report(0.30, 0.35), "pgd_at": report(0.25, 0.40)}, {"meta": 55, "pgd_at": 37})
    lines = table.splitlines()
    assert lines[0] == "| model | clean | `fgsm` | `pgd_l2` | union | union bn@32 | train s |"
    assert lines[2] == "| meta | 90.0 | 40.0 | 40.0 | 30.0 | 35.0 | 55 |"
    assert lines[3] == "| pgd_at | 90.0 | 35.0 | 35.0 | 25.0 | 40.0 | 37 |"
    assert "same 200 test examples" in table


def test_the_summary_calls_differences_within_sampling_noise_a_tie_and_larger_ones_a_lead():
    close = comparison_summary({"meta": report(0.30, 0.31), "pgd_at": report(0.29, 0.30)})
    assert "meta 30.0%, pgd_at 29.0% (within sampling noise: a tie; two standard errors are 6.5 points" in close
    far = comparison_summary({"meta": report(0.10, 0.10, n=1000), "pgd_at": report(0.50, 0.60, n=1000)})
    assert "pgd_at 50.0%, meta 10.0% (pgd_at leads beyond sampling noise" in far
    assert "best 32-shot adaptation: pgd_at 60.0%, meta 10.0%" in far


def test_reports_of_different_settings_are_refused():
    with pytest.raises(ValueError, match="other attacks, examples or adaptations"):
        comparison_table({"a": report(0.3, 0.3), "b": report(0.3, 0.3, n=100)})


def test_the_cli_evaluates_every_run_on_the_first_runs_setting_as_eval_does(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "tasks: {specs: ['fgsm(eps=0.3)']}\nmodel: {name: SmallCNN, hidden: 8}\n"
        "meta: {tasks_per_batch: 1, support_size: 8, query_size: 8, device: cpu}\n"
        "methods: {pgd_at: {attacks: ['fgsm(eps=0.3)']}}\n"
        "eval: {attacks: ['fgsm(eps=0.1)'], n_examples: 40, adapt_shots: 8, adapt_methods: [sgd, bn]}\n"
    )
    for method in ("meta", "pgd_at"):
        out = str(tmp_path / method)
        assert (
            main(["train", "--config", str(config), "--method", method, "--steps", "2", "--out", out, "--quiet"]) == 0
        )
    runs = [str(tmp_path / "meta"), str(tmp_path / "pgd_at")]
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| meta |" in printed and "| pgd_at |" in printed and "Union accuracy" in printed
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| model |")
    for method in ("meta", "pgd_at"):
        assert main(["eval", "--checkpoint", str(tmp_path / method), "--quiet"]) == 0
        alone = json.loads((tmp_path / method / "report.json").read_text())
        for key in ("clean_acc", "per_attack", "union_acc", "adapted", "adapted_union"):
            assert compared[method][key] == alone[key], (method, key)


def test_runs_need_one_name_each():
    with pytest.raises(SystemExit):
        main(["compare"])
    assert main(["compare", "a", "b", "--names", "x"]) == 2
