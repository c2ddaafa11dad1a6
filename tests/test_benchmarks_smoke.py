"""Smoke test of the held-out benchmark pipeline on a tiny budget: protocol -> training -> evaluation ->
JSON -> summary table -> figures; the same for the transfer matrix. The real runs live in benchmarks/ (see
docs/benchmarks.md)."""

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import metaadv as ma

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout  # noqa: E402
import learning_curves  # noqa: E402
import method_cost  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
import transfer  # noqa: E402

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
    reference = ["torchattacks:APGD(eps=2.0, norm='L2', steps=3)"]  # AutoAttack in the converged protocols
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY, "reference_attacks": reference}
    records = [heldout.run_one(m, protocol, 0, "cpu", tmp_path) for m in ("erm", "pgd_at", "meta_so")]
    saved = json.loads((tmp_path / "meta_so_seed0.json").read_text())
    assert saved["method"] == "meta_so" and saved["heldout"]["attacks"] == records[2]["heldout"]["attacks"]
    assert saved["reference"]["n_examples"] == saved["heldout"]["n_examples"]  # the same test digits, zero-shot
    assert len(saved["reference"]["attacks"]) == 1 and 0 <= saved["reference"]["union_acc"] <= 1
    assert set(saved["adapted"]["4"]["adapted_union"]) == {"sgd", "bn", "bn_mix", "bn_sgd", "matched"}
    assert set(records[0]["adapted"]["4"]["adapted_union"]) == {"sgd", "bn", "bn_mix", "bn_sgd"}  # erm: no matched
    robust, clean = saved["adapted"]["4"]["adapted"], saved["adapted"]["4"]["adapted_clean"]  # per attack
    assert clean.keys() == robust.keys() and all(clean[m].keys() == robust[m].keys() for m in robust)
    assert all(0 <= clean[m][a] <= 1 for m in robust for a in robust[m])  # of each adapted model
    assert saved["adapted"]["4"]["matched"]["steps"] == protocol["meta"].get("inner_steps", 1)
    for m in ("sgd", "bn_sgd"):  # chosen on the validation split: recorded with every candidate's score
        chosen, tuning = saved["adapted"]["4"]["finetune"][m], saved["adapted"]["4"]["tuning"][m]
        assert (chosen["steps"], chosen["lr"]) == (tuning["steps"], tuning["lr"]) and len(tuning["scores"]) == 3
    assert saved["validation"]["examples"] == protocol["tune"]["examples"]
    assert saved["history"] and "versions" in saved and "git_commit" in saved
    sweep = saved["sanity"]["eps_sweep"]["pgd_linf"]["acc"]
    assert len(sweep) == 2 and all(0 <= a <= 1 for a in sweep)

    table = report.summarize(records)
    assert all(m in table for m in ("erm", "pgd_at", "meta_so")) and "held-out union" in table
    assert all(f"union {m}@4" in table for m in ("sgd", "bn_mix", "bn_sgd", "best", "matched"))
    assert "reference union" in table
    assert [r["method"] for r in report.load_records(tmp_path)] == ["erm", "pgd_at", "meta_so"]  # protocol order

    written = plots.plot_folder(tmp_path, tmp_path / "figures")
    kinds = {p.stem.removeprefix(tmp_path.name + "_") for p in written}
    assert {"heldout", "eps", "cost", "fewshot", "adaptation", "meta_so_training"} <= kinds
    assert all(p.stat().st_size > 5000 for p in written)


def test_the_summary_reports_the_mean_over_held_out_attacks_next_to_the_union():
    def record(seed, a, b, union):
        acc = {"a": a, "b": b}
        return {
            "method": "m", "seed": seed, "train_seconds": 10.0, "sanity": {"warnings": []},
            "heldout": {"attacks": ["a", "b"], "per_attack": acc, "clean_acc": 0.9, "union_acc": union},
            "train_attacks": {"union_acc": 0.3},
            "adapted": {"8": {"adapted": {"bn": acc}, "adapted_union": {"bn": union}}},
        }  # fmt: skip

    table = report.summarize([record(0, 0.2, 0.6, 0.1), record(1, 0.4, 0.8, 0.1)])
    header, _, row = table.splitlines()[:3]
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["**held-out union**"] == "**10.0 ± 0.0**"
    assert cells["held-out mean"] == "50.0 ± 14.1"  # (0.4, 0.6) over seeds
    assert cells["union bn@8"] == "10.0 ± 0.0" and cells["mean bn@8"] == "50.0 ± 14.1"
    assert cells["union best@8"] == cells["union bn@8"] and "matched@8" not in table  # best of what ran


def test_the_summary_gives_the_reference_attacks_beside_the_held_out_ones_and_a_dash_where_a_run_has_none():
    def record(seed, reference=None):
        return {
            "method": "m", "seed": seed, "train_seconds": 1.0, "sanity": {"warnings": []}, "adapted": {},
            "heldout": {"attacks": ["a"], "per_attack": {"a": 0.5}, "clean_acc": 0.9, "union_acc": 0.5},
            "train_attacks": {"union_acc": 0.3},
            **({"reference": reference} if reference else {}),
        }  # fmt: skip

    aa = {"attacks": ["aa"], "per_attack": {"aa": 0.4}, "union_acc": 0.4}
    header, _, row = report.summarize([record(0, aa), record(1)]).splitlines()[:3]
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["reference `aa`"] == cells["reference union"] == "40.0"  # the one run that has it
    header, _, row = report.summarize([record(0)]).splitlines()[:3]
    assert "reference" not in header


def test_the_summary_gives_the_best_common_adaptation_and_matched_apart():
    def record(method, sgd, bn, matched=None):
        at = {"adapted": {"sgd": {"a": sgd}, "bn": {"a": bn}}, "adapted_union": {"sgd": sgd, "bn": bn}}
        if matched is not None:
            at["adapted"]["matched"], at["adapted_union"]["matched"] = {"a": matched}, matched
        return {
            "method": method, "seed": 0, "train_seconds": 1.0, "sanity": {"warnings": []}, "adapted": {"8": at},
            "heldout": {"attacks": ["a"], "per_attack": {"a": 0.1}, "clean_acc": 0.9, "union_acc": 0.1},
            "train_attacks": {"union_acc": 0.3},
        }  # fmt: skip

    table = report.summarize([record("pgd_at", 0.2, 0.4), record("meta_so", 0.5, 0.3, matched=0.9)])
    header, _, pgd_at, meta_so = table.splitlines()[:4]
    cells = [dict(zip(header.split(" | "), row.split(" | "), strict=True)) for row in (pgd_at, meta_so)]
    assert [c["union best@8"] for c in cells] == ["40.0", "50.0"]  # bn for pgd_at, sgd for meta_so: not matched
    assert [c["union matched@8"] for c in cells] == ["–", "90.0"]
    assert "inner-loop gain" not in header  # no run logged the adaptation gap
    logged = record("meta_so", 0.5, 0.3, matched=0.9)
    logged["history"] = [{"adaptation_gap": [g, g]} for g in (0.5, 0.0, 0.0, 0.0, 0.1)]  # the last fifth: 0.1
    header, _, _, meta_so = report.summarize([record("pgd_at", 0.2, 0.4), logged]).splitlines()[:4]
    cells = [c.strip() for c in header.strip("|").split("|")], [c.strip() for c in meta_so.strip("|").split("|")]
    assert dict(zip(*cells, strict=True))["inner-loop gain (points)"] == "10.0"


def without_times(record: Any) -> Any:
    """A record without its wall-clock fields (``seconds``, ``train_seconds``, ...), at every depth."""
    if isinstance(record, dict):
        return {k: without_times(v) for k, v in record.items() if "seconds" not in k}
    return [without_times(v) for v in record] if isinstance(record, list) else record


@pytest.mark.slow
def test_a_run_stopped_in_training_or_evaluation_resumes_and_writes_what_one_run_writes(tmp_path, monkeypatch):
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY, "epochs": 2}
    train_data, _ = heldout.split_validation(heldout.load_data(protocol)[0], protocol["tune"]["examples"])
    work = tmp_path / "stopped" / "checkpoints" / "meta_so_seed0"
    heldout.train("meta_so", {**protocol, "epochs": 1}, train_data, 0, "cpu", checkpoint_dir=work, resume=True)

    def session_ends(*args, **kwargs):
        raise KeyboardInterrupt

    sanity = heldout.sanity
    monkeypatch.setattr(heldout, "sanity", session_ends)  # the last evaluation stage
    with pytest.raises(KeyboardInterrupt):
        heldout.run_one("meta_so", protocol, 0, "cpu", tmp_path / "stopped")  # trains the second epoch only
    progress = heldout.status(protocol, [0], ["meta_so", "pgd_at"], tmp_path / "stopped")
    assert progress == ["meta_so_seed0: trained 6/6 steps, evaluated: 4_shots, reference, train_attacks",
                        "pgd_at_seed0: not started"]  # fmt: skip
    monkeypatch.setattr(heldout, "sanity", sanity)
    monkeypatch.setattr(heldout, "tune_finetuning", session_ends)  # the finished stages do not run again
    resumed = heldout.run_one("meta_so", protocol, 0, "cpu", tmp_path / "stopped")
    assert heldout.status(protocol, [0], ["meta_so"], tmp_path / "stopped") == ["meta_so_seed0: done"]
    monkeypatch.undo()
    straight = heldout.run_one("meta_so", protocol, 0, "cpu", tmp_path / "straight")
    assert len(straight["history"]) == 2 * len(train_data[1]) // 64  # two epochs of 64-example meta-batches
    assert without_times(resumed) == without_times(straight)
    assert resumed["eval_seconds"] > resumed["tune_seconds"] > 0  # the saved stages' times are kept
    assert len(list((tmp_path / "straight" / "checkpoints" / "meta_so_seed0").glob("*.pt"))) == 1  # keep_last=1
    changed = {**protocol, "train_attacks": ["fgsm(eps=0.2)", "pgd_linf(eps=0.3, steps=2)"], "shots": []}
    with pytest.raises(ma.CheckpointError, match="--overwrite"):  # another run's checkpoint is never resumed
        heldout.run_one("meta_so", changed, 0, "cpu", tmp_path / "straight")
    fresh = heldout.run_one("meta_so", changed, 0, "cpu", tmp_path / "straight", fresh=True)
    assert len(fresh["history"]) == len(straight["history"]) and fresh["adapted"] == {}


def test_the_validation_split_is_held_out_of_training_and_meta_runs_get_their_own_inner_loop():
    x, y = torch.arange(10.0).view(10, 1, 1, 1) / 10, torch.arange(10)
    (_, y_train), (_, y_val) = heldout.split_validation((x, y), 3)
    assert y_train.tolist() == list(range(7)) and y_val.tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="must leave training examples"):
        heldout.split_validation((x, y), 10)
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY}
    model = ma.models.build(protocol["model"])
    lr = {k: torch.full_like(p, 0.05) for k, p in model.named_parameters()}
    variant = {**protocol, "meta_variants": {"meta_sgd": {"learn_inner_lr": True, "inner_steps": 2}}}
    meta = heldout.adaptations("meta_sgd", variant, ma.TrainResult(model, artifacts={"inner_lr": lr}), 0, "cpu")
    assert meta["adapt_methods"] == ("sgd", "bn", "bn_mix", "bn_sgd", "matched")
    assert meta["inner_loop"].steps == 2 and meta["inner_loop"].lr is lr
    baseline = heldout.adaptations("pgd_at", protocol, ma.TrainResult(model), 0, "cpu")
    assert baseline == {"adapt_methods": ("sgd", "bn", "bn_mix", "bn_sgd")}


def test_method_cost_times_a_step_of_each_method_and_counts_the_protocols_steps():
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY}
    seconds = method_cost.time_methods(protocol, ["erm", "pgd_at", "meta_so"], steps=1, repeats=1, device="cpu")
    assert set(seconds) == {"erm", "pgd_at", "meta_so"} and all(math.isfinite(s) for s in seconds.values())
    assert method_cost.steps_per_epoch("pgd_at", protocol, 256) == 256 // protocol["batch_size"]
    assert method_cost.steps_per_epoch("meta_so", protocol, 256) == 256 // (2 * (16 + 16))  # tasks x (S + Q)


def test_every_shipped_protocol_loads_and_names_valid_attacks():
    for path in sorted((ROOT / "benchmarks" / "protocols").glob("*.yaml")):
        if "families" in yaml.safe_load(path.read_text()):  # a transfer protocol: tested below
            continue
        protocol = heldout.load_protocol(path, quick=False)
        assert protocol["held_out"] and protocol["methods"], path.name
        assert not set(protocol["train_attacks"]) & set(protocol["held_out"]), (
            f"{path.name}: held-out attack trained on"
        )


def test_a_baseline_variant_trains_its_method_with_the_options_it_names(monkeypatch):
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY,
                "baseline_variants": {"ramp_lambda1": {"method": "ramp", "ramp_lambda": 1.0}}}  # fmt: skip
    calls = []
    monkeypatch.setattr(heldout.ma, "train", lambda method, model, data, attacks, **kw: calls.append(
        (attacks, {"method": method, **kw})))  # fmt: skip
    heldout.train("ramp_lambda1", protocol, None, 0, "cpu")
    heldout.train("ramp", protocol, None, 0, "cpu")
    assert [a for a, _ in calls] == [protocol["train_attacks"]] * 2
    assert calls[0][1]["method"] == calls[1][1]["method"] == "ramp"
    assert calls[0][1]["ramp_lambda"] == 1.0 and "ramp_lambda" not in calls[1][1]
    with pytest.raises(ValueError, match="unknown method 'ramp_lambda2'"):
        heldout.train("ramp_lambda2", protocol, None, 0, "cpu")


def test_a_baseline_variant_must_name_a_known_method(tmp_path):
    bad = yaml.safe_load(heldout.DEFAULT_PROTOCOL.read_text()) | {"baseline_variants": {"r": {"method": "rmp"}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="baseline variant 'r' needs method"):
        heldout.load_protocol(tmp_path / "bad.yaml", quick=False)


@pytest.mark.parametrize("scored", [0, 293, 2.5, "all"])
def test_the_tuning_must_score_on_validation_examples_beside_the_largest_support_set(tmp_path, scored):
    protocol = yaml.safe_load(heldout.DEFAULT_PROTOCOL.read_text()) | {"shots": [4, 8]}  # 300 validation examples
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**protocol, "tune": {"scored_examples": 292}}))
    assert heldout.load_protocol(tmp_path / "p.yaml", quick=False)["tune"]["scored_examples"] == 292
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**protocol, "tune": {"scored_examples": scored}}))
    with pytest.raises(ValueError, match=r"tune.scored_examples must be an integer in \[1, 292\]"):
        heldout.load_protocol(tmp_path / "bad.yaml", quick=False)


def test_committed_full_results_cover_three_seeds_and_pass_the_sanity_checks():
    """The numbers in docs/benchmarks.md come from these files."""
    for name in ("linf_heldout", "leave_out_linf", "leave_out_l2", "leave_out_l1"):
        records = report.load_records(ROOT / "benchmarks" / "results" / name)
        methods = records[0]["config"]["methods"]
        assert {(r["method"], r["seed"]) for r in records} == {(m, s) for m in methods for s in (0, 1, 2)}, name
        for r in records:
            assert r["sanity"]["warnings"] == [] and r["sanity"]["unbounded_acc"] <= 0.05, (name, r["method"])
            assert r["heldout"]["n_examples"] == 500 and set(r["adapted"]) == {"8", "32", "128"}


def test_every_committed_summary_is_the_report_of_its_runs():
    """``summary.md`` beside the JSONs is what ``benchmarks/report.py`` writes from them (not a stale table)."""
    folders = [d for d in sorted((ROOT / "benchmarks" / "results").iterdir()) if (d / "summary.md").exists()]
    checked = 0
    for folder in folders:
        records = report.load_records(folder)
        if records and all("heldout" in r for r in records):  # the transfer matrix has its own summary
            expected = report.summary_markdown(records)
            assert (folder / "summary.md").read_text() == expected, f"python benchmarks/report.py {folder}"
            checked += 1
    assert checked >= 5


# --- transfer matrix ----------------------------------------------------------------------------------

TINY_TRANSFER = {
    "name": "tiny_transfer", "data": "mnist5k", "model": {"name": "SmallCNN", "hidden": 32}, "epochs": 1,
    "batch_size": 32, "methods": ["avg", "max", "msd", "sat", "ramp", "meta_so"],
    "meta": {"tasks_per_batch": 2, "support_size": 8, "query_size": 8, "inner_steps": 1, "inner_lr": 0.01},
    "families": {
        "linf": {"train": "fgsm(eps=0.3)", "eval": "pgd_linf(eps=0.3, steps=2)"},
        "l2": {"train": "pgd_l2(eps=2.0, steps=1)", "eval": "pgd_l2(eps=2.0, steps=2)"},
        "spatial": {"train": "spatial(steps=1)", "eval": "spatial(steps=2)"},
    },
    "n_examples": 24,
}  # fmt: skip


def test_transfer_matrix_pipeline_writes_the_full_matrix_and_heatmaps(tmp_path, monkeypatch):
    """3 families x (3 single-family rows + 6 methods), 2 training steps each, 24 test digits (~20 s)."""
    monkeypatch.setenv("METAADV_GIT_COMMIT", "smoke-test")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_TRANSFER, sort_keys=False))
    protocol = transfer.load_protocol(tmp_path / "tiny.yaml", quick=True)
    out = tmp_path / "out"
    transfer.run_all(protocol, [0], None, "cpu", out)

    matrix = json.loads((out / "matrix.json").read_text())
    rows = ["at_linf", "at_l2", "at_spatial", *TINY_TRANSFER["methods"]]
    assert matrix["rows"] == rows and matrix["columns"] == ["linf", "l2", "spatial", "union"]
    assert len(matrix["acc"]) == len(rows) and all(len(r) == 4 for r in matrix["acc"])
    assert all(0 <= v <= 1 for row in matrix["acc"] for v in row)
    for i, family in enumerate(matrix["normalized_columns"]):  # the diagonal normalizes to 1 where it is > 0
        assert matrix["normalized"][rows.index(f"at_{family}")][i] in (1.0, None)
    union = [row[-1] for row in matrix["acc"]]
    assert all(u <= min(row[:-1]) + 1e-9 for u, row in zip(union, matrix["acc"], strict=True))
    msd = json.loads((out / "msd_seed0.json").read_text())
    assert msd["trained_on"] == [protocol["families"][f]["train"] for f in ("linf", "l2")]  # Lp families only
    assert msd["versions"] and msd["git_commit"] == "smoke-test" and msd["history"]
    assert {p.name for p in out.glob("*_seed0.json")} == {f"{r}_seed0.json" for r in rows}
    assert all((out / f).stat().st_size > 5000 for f in ("transfer.png", "transfer_normalized.png"))
    assert "| ramp |" in (out / "summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a run whose JSON exists must be skipped")

    monkeypatch.setattr(transfer, "run_one", no_training)
    assert transfer.run_all(protocol, [0], None, "cpu", out) == matrix  # resumes from the JSON alone
    written = plots.plot_folder(out, tmp_path / "figures")
    assert [p.name for p in written] == ["out_transfer.png", "out_transfer_normalized.png"]
    ramp = json.loads((out / "ramp_seed0.json").read_text())
    ramp["config"]["n_examples"] = 12  # a run evaluated on other test digits cannot join the matrix
    (out / "ramp_seed0.json").write_text(json.dumps(ramp))
    with pytest.raises(ValueError, match="different numbers of test digits"):
        transfer.run_all(protocol, [0], None, "cpu", out)


def test_shipped_transfer_protocol_names_valid_attacks():
    path = ROOT / "benchmarks" / "protocols" / "transfer_mnist5k.yaml"
    protocol = transfer.load_protocol(path)
    for family in protocol["families"].values():
        ma.attacks.make(family["train"]), ma.attacks.make(family["eval"])
    plan = transfer.row_plan(protocol)
    assert [r for r in plan if r.startswith("at_")] == [f"at_{f}" for f in protocol["families"]]
    assert {"avg", "max", "msd", "sat", "ramp", "meta_so"} <= set(plan)
    assert all(ma.attacks.make(a).norm in ("linf", "l2", "l1") for a in plan["msd"][1])
    with pytest.raises(ValueError, match="unknown families"):
        transfer.load_protocol(path, families=["linf", "fog"])


# --- unforeseen families: protocols (c) and (d) -------------------------------------------------------------


TINY_UNFORESEEN = {
    "epochs": 1, "train_examples": 128, "n_examples": 16, "sanity_examples": 16, "shots": [4],
    "model": {"name": "SmallCNN", "hidden": 16}, "meta": {"tasks_per_batch": 2, "support_size": 8, "query_size": 8},
    "batch_size": 32, "black_box": "torchattacks:Square(eps=0.3, n_queries=10)",
    "tune": {"examples": 24, "steps": [1], "lr": [0.01], "scored_examples": 12},
}  # fmt: skip


def _two_steps(spec: str) -> str:
    return re.sub(r"steps=\d+", "steps=2", spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unforeseen_lp_trained", "unforeseen_mixed_trained"])
def test_unforeseen_protocols_run_in_quick_mode(name, tmp_path, monkeypatch):
    """Protocols (c) and (d) of docs/unforeseen.md end to end on a tiny budget: every held-out family is
    attacked zero-shot and after few-shot adaptation (sgd, bn, bn_mix, bn_sgd; matched for meta-training), for a
    baseline and for meta-training."""
    monkeypatch.setenv("METAADV_GIT_COMMIT", "smoke-test")
    path = ROOT / "benchmarks" / "protocols" / f"{name}.yaml"
    full = heldout.load_protocol(path, quick=False)
    protocol = {**heldout.load_protocol(path, quick=True), **TINY_UNFORESEEN}
    protocol["train_attacks"] = [_two_steps(a) for a in full["train_attacks"]]
    protocol["held_out"] = [_two_steps(a) for a in full["held_out"]]  # every held-out family
    for method in ("ramp", "meta_so"):
        record = heldout.run_one(method, protocol, 0, "cpu", tmp_path)
        assert set(record["heldout"]["attacks"]) == {ma.attacks.make(a).spec for a in protocol["held_out"]}
        assert set(record["adapted"]["4"]["adapted_union"]) - {"matched"} == {"sgd", "bn", "bn_mix", "bn_sgd"}
        assert ("matched" in record["adapted"]["4"]["adapted_union"]) == (method == "meta_so")
        assert record["validation"] == {"examples": 24, "scored_examples": 12, "held_out_of": "the training data"}
        assert 0 <= record["heldout"]["union_acc"] <= 1


# --- kernel launches and host syncs (benchmarks/op_count.py) -------------------------------------------------


def test_the_op_counter_counts_a_small_computation_exactly():
    import op_count
    import torch

    a, b = torch.randn(3), torch.randn(3)
    with op_count.OpCounter() as counter:
        s = a + b  # one launch
        s.view(3, 1).t().unsqueeze(0)  # views: no launch
        s.sum().item()  # one launch, one sync
    assert counter.counts.ops == {"aten.add": 1, "aten.sum": 1} and counter.counts.n_syncs == 1

    x = torch.randn(4, requires_grad=True)
    g, tolist = torch.Generator().manual_seed(0), torch.Tensor.tolist
    with op_count.OpCounter() as counter:
        (x * x).sum().backward()  # forward: mul, sum, the gradient seed ones_like; autograd: the backward
        x.detach().tolist()  # a sync that dispatches nothing on CPU
        torch.multinomial(torch.ones(3), 2, generator=g).tolist()  # host tensors: no launch, no sync
    c = counter.counts
    assert c.phases["forward"] == 3 and c.phases["autograd"] == 3 and c.n_syncs == 1
    assert c.host_ops == {"aten.ones": 1, "aten.multinomial": 1} and sum(c.host_reads.values()) == 1
    assert torch.Tensor.tolist is tolist  # the wrappers are gone after the block
    with op_count.OpCounter() as counter:
        torch.as_tensor(0.3, device=a.device)  # a Python number copied to the device: a launch and a sync
    assert counter.counts.ops == {"h2d copy": 1} and counter.counts.n_syncs == 1


def test_no_step_waits_for_the_device_and_a_logging_window_reads_it_once():
    import op_count

    w = op_count.Workload(tasks=2, shots=4, attack="pgd_linf(eps=0.3, steps=1)", hidden=8)
    counts = {v: op_count.step_counts(v, w) for v in op_count.VARIANTS}
    assert all(c.n_ops > 0 and c.n_syncs == 0 for c in counts.values())
    assert counts["meta"].n_ops >= counts["meta_batched"].n_ops
    assert all(c.phases["optimizer"] > 0 and c.phases["autograd"] > 0 for c in counts.values())
    windows = {v: op_count.window_counts(v, w) for v in op_count.VARIANTS}
    assert all(c.n_syncs == 1 and 0 < c.n_ops < counts["pgd_at"].n_ops for c in windows.values())


def test_the_converged_epoch_is_the_first_after_which_the_last_fifth_moves_under_a_point():
    rising = [10, 20, 30, 40, 50, 55, 58, 60, 60.5, 60.8, 61, 61.2, 61.3, 61.3, 61.4, 61.4]
    assert learning_curves.converged_epoch(rising, min_epochs=5) == 9  # from epoch 9 on: < 1 point per fifth
    assert learning_curves.converged_epoch(rising, min_epochs=15) == 15
    assert learning_curves.converged_epoch([10, 20, 30], min_epochs=2) is None
    assert learning_curves.converged_epoch(rising, min_epochs=20) is None  # fewer epochs than the minimum


@pytest.mark.slow
def test_learning_curves_resume_epoch_by_epoch_and_equal_one_run(tmp_path, monkeypatch):
    protocol = {**heldout.load_protocol(heldout.DEFAULT_PROTOCOL, quick=True), **TINY, "tune": {"examples": 32,
                "steps": [1], "lr": [0.01]}}  # fmt: skip
    monkeypatch.setattr(learning_curves, "load_protocol", lambda path, quick: protocol)
    out = tmp_path / "curves.json"
    argv = ["learning_curves.py", "--quick", "--methods", "pgd_at", "--out", str(out), "--work", str(tmp_path / "w")]
    monkeypatch.setattr(sys, "argv", argv)
    learning_curves.main()
    points = json.loads(out.read_text())["pgd_at"]
    assert [p["epoch"] for p in points] == [1, 2] and 0 <= points[-1]["heldout"]["union"] <= 100
    assert set(points[-1]["heldout"]["per_attack"]) == {ma.attacks.make(a).spec for a in protocol["held_out"]}
    learning_curves.main()  # a rerun resumes: nothing left to train
    assert json.loads(out.read_text())["pgd_at"] == points
    train_data, _ = heldout.split_validation(heldout.load_data(protocol)[0], 32)
    where = {"checkpoint_dir": tmp_path / "again", "resume": True, "keep_last": 1}
    for epoch in (1, 2):  # what the script does: each epoch a resume of the previous one
        resumed = heldout.train("meta_so", {**protocol, "epochs": epoch}, train_data, 0, "cpu", **where)
    straight = heldout.train("meta_so", {**protocol, "epochs": 2}, train_data, 0, "cpu")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
