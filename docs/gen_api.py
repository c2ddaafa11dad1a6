"""Generate docs/api.md from the public docstrings:  python docs/gen_api.py  (a test checks it is current)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import metaadv
from metaadv import attacks, checkpoint, data, engine, models, plots, training_methods
from metaadv.engine import resume
from metaadv.eval import external, matched, tuning
from metaadv.meta import options
from metaadv.meta.options import attention, base, film, generators, meta_dropout, step_bn

SECTIONS = [
    ("Training", [metaadv.methods, metaadv.train, metaadv.LoopConfig, metaadv.TrainResult]),
    ("Meta-training", [metaadv.meta_train, metaadv.MetaConfig, metaadv.adapt]),
    ("Meta options", [base.MetaOption, options.wrap, options.check]),
    ("Task attention", [attention.TaskAttention]),
    (
        "Model conditioning and per-step statistics",
        [film.FiLM, film.task_code, film.with_code, meta_dropout.MetaDropout, step_bn.StepBatchNorm],
    ),
    ("Tasks", [metaadv.AttackDistribution, metaadv.AttackTask, generators.PersistentGenerators]),
    ("Attacks", [attacks.make, attacks.register, attacks.available, attacks.Attack]),
    (
        "Evaluation",
        [metaadv.evaluate, metaadv.RobustnessReport, matched.InnerLoopSpec, tuning.tune_finetuning, tuning.Tuning],
    ),
    ("Evaluating a model metaadv did not train", [external.load_model, external.load_data, external.check_compatible]),
    ("Data and models", [data.load, data.TensorDataset, data.to_tensors, models.SmallCNN, models.build]),
    ("Training methods", [training_methods.get, training_methods.Method]),
    ("Plots", [plots.robustness_bars, plots.training_curves, plots.plot_task_weights]),
    ("Run configs (CLI)", [metaadv.RunConfig, metaadv.load_run_config]),
    (
        "The engine, checkpoints and long runs",
        [
            engine.fit,
            engine.Trainable,
            engine.StepOutput,
            resume.Checkpointing,
            engine.TrainingInterrupted,
            engine.NonFiniteLossError,
            checkpoint.load_checkpoint,
            checkpoint.latest_checkpoint,
            checkpoint.save_checkpoint,
            checkpoint.CheckpointError,
            checkpoint.UnsafeCheckpointError,
        ],
    ),
]


def signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", text)  # stable across runs


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.",
        "",
    ]
    for title, objects in SECTIONS:
        lines += [f"## {title}", ""]
        for obj in objects:
            kind = "class" if inspect.isclass(obj) else "def"
            name = f"{obj.__module__}.{obj.__qualname__}"
            lines += [f"### `{name}`", "", "```python", f"{kind} {obj.__name__}{signature(obj)}", "```", ""]
            lines += [inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
            if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__"):
                source = inspect.getsource(obj)
                fields = [ln.strip() for ln in source.splitlines() if "  # " in ln and ":" in ln.split("#")[0]]
                if fields:
                    lines += ["Fields:", "", "```python", *fields, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("api.md")
    target.write_text(render())
    print(f"wrote {target}")
