"""`metaadv eval --model`: a classifier metaadv did not train, from a factory with `torch.save` or safetensors weights
or from a TorchScript file, on a `.pt` file of images, reports what `metaadv.evaluate` reports; every mistake a
user can make gives exit code 2 and one line naming it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from metaadv import evaluate
from metaadv.checkpoint import UnsafeCheckpointError
from metaadv.cli import main
from metaadv.eval import TorchScriptModel, load_data, load_model

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["fgsm(eps=0.1)", "pgd_linf(eps=0.1, steps=2)"]
SCRIPTED = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.load` is deprecated"
)

MODELS = """
from torch import nn

def small_cnn(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, num_classes))

def wide_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

def five_classes():
    return small_cnn(num_classes=5)

def feature_maps():
    return nn.Conv2d(1, 4, 3, padding=1)

class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        return self.net(x), x

def needs_arguments(width):
    return small_cnn()

def returns_a_string():
    return "small_cnn"

NOT_CALLABLE = 3
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the current directory, holding mymodels.py (MODELS), the weights of a seeded small_cnn
    (weights.pt, weights.safetensors), data.pt (64 images (1, 8, 8) in [0, 1], labels 0..9) and the model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(MODELS)
    namespace: dict = {}
    exec(MODELS, namespace)
    torch.manual_seed(0)
    model = namespace["small_cnn"]().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that loading them matters
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), "weights.pt")
    save_file(model.state_dict(), "weights.safetensors")
    x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 10
    torch.save((x, y), "data.pt")
    yield tmp_path, namespace, model, (x, y)
    sys.modules.pop("mymodels", None)  # the next test's mymodels.py is another file


def cli_report(capsys, *argv: str) -> dict:
    """Run ``metaadv eval`` with ``argv`` (exit 0); the report.json it wrote in the current directory."""
    assert main(["eval", *argv, "--quiet"]) == 0, capsys.readouterr().err
    assert "| union |" in capsys.readouterr().out
    return json.loads(Path("report.json").read_text())


def numbers(report: dict) -> dict:
    """The report without its wall-clock time and the CLI's record of where the model came from."""
    meta = {k: v for k, v in report["meta"].items() if k != "source"}
    return {**{k: v for k, v in report.items() if k != "seconds"}, "meta": meta}


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
def test_a_factory_with_its_weights_reports_what_evaluate_reports(work, capsys, weights):
    _, _, model, data = work
    options = {"n_examples": 32, "adapt_shots": 8, "adapt_steps": 10, "adapt_methods": ("sgd", "bn")}
    cli = cli_report(
        capsys, "--model", "mymodels:small_cnn", "--weights", weights, "--data", "data.pt", "--attacks", *ATTACKS,
        "--n-examples", "32", "--adapt-shots", "8", "--adapt-methods", "sgd", "bn",
    )  # fmt: skip
    python = evaluate(model, data, ATTACKS, **options).to_dict()
    assert numbers(cli) == numbers(python)
    assert cli["meta"]["source"] == {"model": "mymodels:small_cnn", "weights": weights, "data": "data.pt"}


@SCRIPTED
@pytest.mark.parametrize("name", ["model.ts", "model.pt"])
def test_a_torchscript_file_alone_reports_what_evaluate_reports_for_its_module(work, capsys, name):
    _, _, model, data = work
    torch.jit.script(model).save(name)
    cli = cli_report(capsys, "--model", name, "--data", "data.pt", "--attacks", *ATTACKS, "--adapt-shots", "8")
    assert numbers(cli) == numbers(evaluate(model, data, ATTACKS, adapt_shots=8).to_dict())


def test_load_model_puts_the_current_directory_on_sys_path_for_the_import_only(work):
    tmp_path, *_ = work
    model = load_model("mymodels:small_cnn", "weights.pt")
    assert not model.training
    assert str(tmp_path) not in sys.path


@SCRIPTED
def test_a_torchscript_model_is_a_plain_module_that_functional_call_can_swap(work):
    _, _, model, (x, _) = work
    torch.jit.script(model).save("model.ts")
    loaded = load_model("model.ts")
    assert isinstance(loaded, TorchScriptModel) and not loaded.training
    zeros = {k: torch.zeros_like(v) for k, v in loaded.named_parameters()}
    assert torch.equal(torch.func.functional_call(loaded, zeros, (x[:2],)), torch.zeros(2, 10))
    assert torch.equal(loaded(x[:2]), model(x[:2]))


def test_load_data_reads_a_tuple_a_dict_or_a_dataset_metaadv_knows(work):
    _, _, _, (x, y) = work
    torch.save({"x": x, "y": y.int()}, "data_dict.pt")
    for name in ("data.pt", "data_dict.pt"):
        got_x, got_y = load_data(name)
        assert torch.equal(got_x, x) and torch.equal(got_y, y) and got_y.dtype == torch.int64
    mnist_x, mnist_y = load_data("mnist5k")
    assert mnist_x.shape == (1000, 1, 28, 28) and mnist_y.shape == (1000,)


def test_weights_holding_pickled_objects_are_refused_as_unsafe(work):
    torch.save(torch.nn.Linear(2, 2), "module.pt")  # the module itself, not its state dict
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects"):
        load_model("mymodels:small_cnn", "module.pt")


def write_bad_files(model: torch.nn.Module, data: tuple) -> None:
    """Every wrong file the error table below names."""
    x, y = data
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if k != "5.bias"}, "missing.pt")
    torch.save({**state, "extra.weight": torch.zeros(1)}, "unexpected.pt")
    torch.save({**state, "5.weight": torch.zeros(10, 3)}, "misshapen.pt")
    torch.save(torch.nn.Linear(2, 2), "module.pt")
    torch.save({"weights": state, "epoch": 3}, "wrapped.pt")
    torch.jit.script(model).save("scripted.ts")
    torch.save((x * 2, y), "bright.pt")
    torch.save(((x * 255).to(torch.uint8), y), "uint8.pt")
    torch.save((x[:, 0], y), "three_dims.pt")
    torch.save({"images": x, "labels": y}, "other_keys.pt")
    torch.save({"x": x, "y": y, "note": object()}, "pickled_data.pt")
    torch.save((x.expand(-1, 3, -1, -1).contiguous(), y), "rgb.pt")


MODEL, WEIGHTS, DATA = "mymodels:small_cnn", "weights.pt", "data.pt"
ERRORS = {
    "missing module": (["--model", "no_such_module:small_cnn"], "no module named 'no_such_module'"),
    "missing factory": (["--model", "mymodels:big_cnn"], "has no 'big_cnn'; its callables: "),
    "not callable": (["--model", "mymodels:NOT_CALLABLE"], "NOT_CALLABLE is not callable"),
    "factory needs arguments": (["--model", "mymodels:needs_arguments"], "needs_arguments(width) needs arguments"),
    "factory returns no module": (["--model", "mymodels:returns_a_string"], "returned a str, not a torch.nn.Module"),
    "malformed spec": (["--model", "mymodels.small_cnn"], "must be 'package.module:factory'"),
    "missing key": (["--weights", "missing.pt"], "1 missing key(s) [5.bias]"),
    "unexpected key": (["--weights", "unexpected.pt"], "1 unexpected key(s) [extra.weight]"),
    "shape mismatch": (["--weights", "misshapen.pt"], "5.weight: (10, 3) in the file, (10, 64) in the model"),
    "another model's weights": (["--model", "mymodels:wide_cnn"], "shape mismatch(es): 0.weight: (4, 1, 3, 3)"),
    "pickled weights": (["--weights", "module.pt"], "refused to load module.pt: it contains pickled Python objects"),
    "not a state dict": (["--weights", "wrapped.pt"], "must hold a state dict (parameter name -> tensor)"),
    "missing weights": (["--weights", "nowhere.pt"], "no weights file nowhere.pt"),
    "TorchScript as weights": (["--weights", "scripted.ts"], "scripted.ts is a TorchScript archive, not weights"),
    "state dict as TorchScript": (["--model", "weights.pt", "--weights"], "weights.pt is not a TorchScript archive"),
    "weights with TorchScript": (["--model", "scripted.ts"], "carries its weights: give no weights with it"),
    "missing TorchScript file": (["--model", "nowhere.ts", "--weights"], "no TorchScript file nowhere.ts"),
    "not logits": (["--model", "mymodels:feature_maps", "--weights"], "float logits of shape (batch, num_classes)"),
    "a tuple out": (["--model", "mymodels:TupleOut", "--weights"], "it returned tuple"),
    "too few classes": (
        ["--model", "mymodels:five_classes", "--weights"],
        "labels up to 9 (10 classes) but the model mymodels:five_classes outputs 5 logits per image",
    ),
    "images outside [0, 1]": (["--data", "bright.pt"], "the images in bright.pt must lie in [0, 1]"),
    "integer images": (["--data", "uint8.pt"], "must be a floating-point tensor"),
    "images not (B, C, H, W)": (["--data", "three_dims.pt"], "must have shape (B, C, H, W), got shape (64, 8, 8)"),
    "data of other keys": (["--data", "other_keys.pt"], "must hold (x, y) or {'x': x, 'y': y}"),
    "pickled data": (["--data", "pickled_data.pt"], "refused to load pickled_data.pt"),
    "missing data": (["--data", "nowhere.pt"], "data 'nowhere.pt' is neither a dataset metaadv knows"),
    "the model does not take the images": (["--data", "rgb.pt"], "failed on images of shape (3, 8, 8)"),
    "no attacks": (["--attacks"], "--model needs --attacks"),
    "no data": (["--data"], "--model needs --data"),
    "TorchScript with bn": (
        ["--model", "scripted.ts", "--weights", "--adapt-shots", "8", "--adapt-methods", "bn"],
        "adapt method 'bn' needs the model's Python modules",
    ),
}


def argv_with(changes: list[str]) -> list[str]:
    """``--model MODEL --weights WEIGHTS --data DATA --attacks fgsm(eps=0.1)`` with ``changes``: a flag followed
    by a value replaces that flag's value, a flag followed by a flag (or last) is left out, other flags are added."""
    args = {"--model": [MODEL], "--weights": [WEIGHTS], "--data": [DATA], "--attacks": ["fgsm(eps=0.1)"]}
    i = 0
    while i < len(changes):
        flag, value = changes[i], changes[i + 1] if i + 1 < len(changes) else None
        if value is None or value.startswith("--"):
            args.pop(flag)
            i += 1
        else:
            args[flag] = [value]
            i += 2
    return [token for flag, values in args.items() for token in (flag, *values)]


@SCRIPTED
@pytest.mark.parametrize("case", list(ERRORS))
def test_every_mistake_exits_2_with_a_message_naming_it(work, capsys, case):
    _, _, model, data = work
    write_bad_files(model, data)
    changes, message = ERRORS[case]
    assert main(["eval", *argv_with(changes), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaadv eval: error: ") and message in err, err
    assert not Path("report.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "data.pt", "--attacks", "fgsm(eps=0.1)"], "one of the arguments --checkpoint --model is required"),
        (["--checkpoint", "run", "--model", MODEL], "argument --model: not allowed with argument --checkpoint"),
    ],
)
def test_exactly_one_of_checkpoint_and_model(work, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_run_directory_form_refuses_the_model_forms_options(work, capsys):
    assert main(["eval", "--checkpoint", "run", "--weights", WEIGHTS]) == 2
    assert "--weights goes with --model" in capsys.readouterr().err


def test_an_unsafe_weights_file_gives_no_traceback_from_the_shell(work):
    torch.save(torch.nn.Linear(2, 2), "module.pt")
    argv = argv_with(["--weights", "module.pt"])
    proc = subprocess.run([sys.executable, "-m", "metaadv.cli", "eval", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused to load module.pt" in proc.stderr


def readme_model_command() -> list[str]:
    """The README's ``metaadv eval --model`` command, as argv (without the program)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    block = next(b for b in blocks if "metaadv eval --model" in b)
    argv = shlex.split(block.replace("\\\n", " "), comments=True)
    assert argv[:2] == [".venv/bin/metaadv", "eval"]
    return argv[1:]


def test_the_readme_model_command_runs_as_written_on_a_trained_runs_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train = ["train", "--config", str(ROOT / "configs" / "mnist5k.yaml"), "--out", "runs/meta", "--steps", "1"]
    assert main([*train, "--quiet"]) == 0  # the README's preceding command, for one meta-step
    assert main(readme_model_command()) == 0
    report = json.loads((tmp_path / "runs/meta/as_any_model/report.json").read_text())
    assert report["n_examples"] == 100 and report["attacks"][0] == "fgsm(eps=0.3)"
    assert report["meta"]["source"]["weights"] == "runs/meta/model.pt"
