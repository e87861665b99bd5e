"""rectflow.images.classifier_features: a digits classifier and a CIFAR-style classifier (cached) as FD feature networks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rectflow.data.image_sets import ImageArray, ImageDataset, load_digits_images
from rectflow.errors import CheckpointError, DataError
from rectflow.images.classifier_features import (
    CifarClassifier,
    ClassifierFeatures,
    classifier_accuracy,
    load_cifar_classifier,
    train_cifar_classifier,
    train_classifier_features,
)
from rectflow.images.quality import fd


@pytest.fixture(scope="module")
def digits_features():
    digits = load_digits_images()
    net, report = train_classifier_features(digits, steps=250, seed=0)
    return digits, net, report


def test_classifier_learns_digits_and_features_separate_real_from_corrupted(digits_features):
    digits, net, report = digits_features
    assert report.test_size == 359 and report.train_size == 1438
    assert report.test_accuracy > 0.9  # a feature space that knows what a digit is
    ds = ImageDataset(digits)
    a = ds.sample(600, generator=torch.Generator().manual_seed(1))
    b = ds.sample(600, generator=torch.Generator().manual_seed(2))
    noisy = (a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    same, corrupted = fd(a, b, net, device="cpu"), fd(a, noisy, net, device="cpu")
    assert corrupted > 3 * same


def test_features_shape_and_determinism(digits_features):
    digits, net, _ = digits_features
    x = torch.zeros(5, 1, 8, 8)
    assert net(x).shape == (5, 128) and net.logits(x).shape == (5, 10)
    again, _ = train_classifier_features(digits, steps=250, seed=0)
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=1e-5)  # same seed, same net (CPU reductions may reorder)


def test_unlabelled_or_tiny_data_is_refused():
    imgs = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match="labelled"):
        train_classifier_features(ImageArray(imgs))
    with pytest.raises(DataError, match="too few"):
        train_classifier_features(ImageArray(imgs[:4], torch.tensor([0, 1, 0, 1])))
    with pytest.raises(Exception, match="4x4"):
        ClassifierFeatures(1, 2, 10)


# ----- the CIFAR-style classifier (moved here from benchmarks/_cifar10.py) ------------------------


def _rgb(n: int, seed: int) -> ImageArray:
    """``n`` random 16x16 RGB images whose label (0..9) sets the mean brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = (labels.view(-1, 1, 1, 1) * 25 + torch.randint(0, 20, (n, 3, 16, 16), generator=g)).to(torch.uint8)
    return ImageArray(x, labels, source="rgb")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cifar_classifier_shapes_and_state_dict_keys():
    net = CifarClassifier(width=8)
    x = torch.zeros(3, 3, 16, 16)
    assert net(x).shape == (3, 32) and net.logits(x).shape == (3, 10)
    assert {k.split(".")[0] for k in net.state_dict()} == {"features", "head"}  # what earlier caches hold
    assert net(torch.zeros(2, 3, 4, 4)).shape == (2, 32)


def test_cifar_classifier_trains_and_its_cache_round_trips(tmp_path):
    train, test = _rgb(80, 0), _rgb(40, 1)
    cache = tmp_path / "clf" / "classifier.safetensors"
    net, info = train_cifar_classifier(train, test, 0.5, "cpu", batch=16, width=8, cache=cache)
    assert info["cached"] is False and info["steps"] >= 1 and info["width"] == 8 and info["feature_dim"] == 32
    assert 0.0 <= info["test_accuracy"] <= 1.0 and not net.training
    assert info["test_accuracy"] == classifier_accuracy(net, test, "cpu")
    record = json.loads(cache.with_suffix(".json").read_text())
    assert record["key"] == {"width": 8, "seconds": 0.5, "batch": 16, "size": [16, 16], "n_train": 80}
    again, info2 = train_cifar_classifier(train, test, 0.5, "cpu", batch=16, width=8, cache=cache)
    assert info2 == {**info, "cached": True} and _same_weights(again, net)
    loaded, meta = load_cifar_classifier(cache)
    assert _same_weights(loaded, net) and meta["info"]["steps"] == info["steps"]
    assert [p.name for p in cache.parent.iterdir() if p.name.endswith(".tmp")] == []  # atomic writes leave no temporaries


def test_a_changed_setting_retrains(tmp_path):
    train, test = _rgb(80, 0), _rgb(40, 1)
    cache = tmp_path / "classifier.safetensors"
    train_cifar_classifier(train, test, 0.2, "cpu", batch=16, width=8, cache=cache)
    _, info = train_cifar_classifier(train, test, 0.2, "cpu", batch=8, width=8, cache=cache)
    assert info["cached"] is False
    assert json.loads(cache.with_suffix(".json").read_text())["key"]["batch"] == 8
    _, info = train_cifar_classifier(train, test, 0.2, "cpu", batch=8, width=8, cache=cache)
    assert info["cached"] is True


def test_a_cache_written_by_the_earlier_benchmark_code_loads(tmp_path):
    """benchmarks/_cifar10.py wrote safetensors.torch.save_file + json.dumps({"key", "info"}, indent=1): the caches of
    earlier runs must load with the same key."""
    train, test = _rgb(80, 0), _rgb(40, 1)
    torch.manual_seed(3)
    old = CifarClassifier(8)
    for p in old.parameters():
        p.data.normal_()
    cache = tmp_path / "classifier.safetensors"
    save_file({k: v.detach().contiguous() for k, v in old.state_dict().items()}, str(cache))
    key = {"width": 8, "seconds": 240.0, "batch": 128, "size": [16, 16], "n_train": 80}
    info = {"steps": 3129, "seconds": 240.004, "test_accuracy": 0.7315, "width": 8, "feature_dim": 32}
    cache.with_suffix(".json").write_text(json.dumps({"key": key, "info": info}, indent=1))
    net, got = train_cifar_classifier(train, test, 240.0, torch.device("cpu"), batch=128, width=8, cache=cache)
    assert got == {**info, "cached": True} and _same_weights(net, old)
    loaded, meta = load_cifar_classifier(cache)
    assert _same_weights(loaded, old) and meta == {"key": key, "info": info}


def test_a_missing_or_unlabelled_classifier_input_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_cifar_classifier(tmp_path / "none.safetensors")
    with pytest.raises(DataError, match="labelled"):
        train_cifar_classifier(ImageArray(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)), _rgb(10, 0), 0.1, "cpu", batch=2)
