"""The embedded data set and the reference model: shapes, ranges, a fixed stratified split, clear errors."""

import importlib.util

import pytest
import torch

from metaadv import data, models


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
