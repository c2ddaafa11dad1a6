"""The embedded data set and the reference model: shapes, ranges, a fixed stratified split, clear errors."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metaadv import AttackDistribution, data, load_run_config, models
from metaadv.attacks import make


def test_mnist5k_is_a_fixed_stratified_split_of_real_digits_in_unit_range():
    train, test = data.load("mnist5k")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape[1:] == (1, 28, 28) and train.x.dtype == torch.float32
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) == 1.0
    assert torch.bincount(test.y, minlength=10).tolist() == [100] * 10
    assert len(set(train.y[:50].tolist())) > 5, "shuffled, not sorted by label"
    again, _ = data.load("mnist5k")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    train_rows = {bytes(r.numpy()) for r in (train.x * 255).round().to(torch.uint8).flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in (test.x * 255).round().to(torch.uint8).flatten(1))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="checks the error without torchvision")
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_datasets_without_torchvision_name_the_extra(name):
    with pytest.raises(ImportError, match=r"metaadv\[vision\]"):
        data.load(name)


def test_unknown_dataset_names_list_the_available_ones():
    with pytest.raises(ValueError, match="mnist5k"):
        data.load("imagenet")


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.rand(4, 1, 8, 8) * 2, torch.zeros(4, dtype=torch.long), r"\[0, 1\]"),
        (torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long), "shape"),
        (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), "shape"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4), "integer"),
        (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), "at least one"),
    ],
)
def test_tensor_datasets_are_validated(x, y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        data.TensorDataset(x, y)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_small_cnn_maps_images_to_logits(channels, size):
    model = models.SmallCNN(in_channels=channels, num_classes=7, image_size=size)
    assert model(torch.rand(5, channels, size, size)).shape == (5, 7)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in models.SmallCNN(batch_norm=False).modules())


def test_build_names_the_problem():
    assert isinstance(models.build({"name": "SmallCNN", "hidden": 16}), models.SmallCNN)
    with pytest.raises(ValueError, match="unknown model"):
        models.build({"name": "ResNet"})
    with pytest.raises(ValueError, match="bad arguments"):
        models.build({"name": "SmallCNN", "depth": 3})


def test_preact_resnet18_maps_cifar_images_to_logits_with_11_2m_parameters():
    model = models.build({"name": "PreActResNet18", "in_channels": 3, "num_classes": 10})
    assert isinstance(model, models.PreActResNet18)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 17  # 2 per block + the last
    assert models.PreActResNet18(in_channels=1, num_classes=7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_torchvision_arrays_become_tensor_datasets_in_unit_range():
    """The conversion of torchvision's ``.data``/``.targets`` (checked without downloading anything)."""
    cifar = SimpleNamespace(
        data=np.full((4, 32, 32, 3), 255, np.uint8), targets=[0, 1, 2, 9], classes=list("abcdefghij")
    )
    cifar.data[0, 1, 2] = (0, 51, 102)  # one pixel of image 0 at row 1, column 2 (H, W, C order)
    out = data._torchvision_tensors(cifar)
    assert out.x.shape == (4, 3, 32, 32) and out.x.dtype == torch.float32 and out.num_classes == 10
    assert out.x[0, :, 1, 2].tolist() == pytest.approx([0.0, 0.2, 0.4]) and float(out.x.max()) == 1.0
    assert out.y.tolist() == [0, 1, 2, 9]
    mnist = SimpleNamespace(
        data=torch.zeros(3, 28, 28, dtype=torch.uint8), targets=torch.tensor([1, 2, 3]), classes=list(range(10))
    )
    assert data._torchvision_tensors(mnist).x.shape == (3, 1, 28, 28)


def test_cifar10_config_uses_the_cifar10_threat_models():
    assert set(data.THREAT_MODELS) <= set(data.NAMES)
    eps = data.THREAT_MODELS["cifar10"]
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10_preact.yaml")
    assert cfg.data == "cifar10" and cfg.model["name"] == "PreActResNet18"
    trained = {a.name: a.params["eps"] for a in AttackDistribution(**cfg.tasks).types}
    assert trained["pgd_linf"] == pytest.approx(eps["linf"]) and trained["pgd_l2"] == pytest.approx(eps["l2"])
    held_out = [make(a) for a in cfg.eval["attacks"]]
    assert any(a.name == "pgd_l1" and a.params["eps"] == eps["l1"] for a in held_out)
