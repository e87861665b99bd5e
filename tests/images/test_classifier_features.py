"""rectflow.images.classifier_features: a digits classifier as an FD feature network."""

import pytest
import torch

from rectflow.data.image_sets import ImageArray, ImageDataset, load_digits_images
from rectflow.errors import DataError
from rectflow.images.classifier_features import ClassifierFeatures, train_classifier_features
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
