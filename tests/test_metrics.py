"""The sample-set metrics against float64 references: the Fréchet distance against scipy's matrix square root and
the closed form for Gaussians, the background level on constructed images."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from orw_fast.metrics import background_level, frechet_distance
from orw_fast.rewards import DigitClassifier


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.parametrize("n, m, d", [(50, 70, 3), (33, 200, 17), (129, 129, 128)])
def test_frechet_distance_matches_scipy(n, m, d):
    gen = torch.Generator().manual_seed(n * d)
    a = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)
    b = 0.5 * torch.randn(m, d, generator=gen) + torch.rand(d, generator=gen)
    got = frechet_distance(a.float(), b.float())
    ref = scipy_frechet(a.double().numpy(), b.double().numpy())
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # N(0, diag(s1^2)) vs N(mu, diag(s2^2)): |mu|^2 + sum (s1 - s2)^2, from large samples
    gen = torch.Generator().manual_seed(0)
    s1, s2, mu = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5]), torch.tensor([1.0, -2.0, 0.0])
    a = torch.randn(200_000, 3, generator=gen, dtype=torch.float64) * s1
    b = torch.randn(200_000, 3, generator=gen, dtype=torch.float64) * s2 + mu
    expected = float((mu**2).sum() + ((s1 - s2) ** 2).sum())  # 5 + 5
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.05)


def test_frechet_distance_is_zero_for_one_set_and_positive_otherwise():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, x[:, torch.randperm(8)] * 1.5 + 0.1) > 0.5
    # a non-contiguous view gives the same value as its copy
    wide = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    assert frechet_distance(wide[:, ::2], x) == pytest.approx(frechet_distance(wide[:, ::2].contiguous(), x))


@pytest.mark.parametrize("a, b", [((5,), (5, 3)), ((5, 3), (5, 4)), ((1, 3), (5, 3))])
def test_frechet_distance_rejects_bad_shapes(a, b):
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(torch.zeros(a), torch.zeros(b))


def test_background_level():
    images = torch.full((4, 1, 8, 8), -1.0)
    images[:, :, 2:6, 3:5] = 1.0  # ink
    assert background_level(images) == 0.0
    images[images < 0] = -0.6  # a grey background
    assert background_level(images) == pytest.approx(0.4 * 127.5)
    assert math.isnan(background_level(torch.ones(2, 1, 8, 8)))
    with pytest.raises(ValueError, match="images"):
        background_level(torch.zeros(8, 8))


def test_classifier_penultimate_features_feed_its_last_layer():
    model = DigitClassifier().eval()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    features = model.penultimate(x)
    assert features.shape == (5, 128) and bool((features >= 0).all())
    torch.testing.assert_close(model.head[-1](features), model(x))


def test_digits_quality_ranks_real_digits_above_blurred_and_noisy_ones():
    from orw_fast.data.digits import load_digits_dataset
    from orw_fast.rewards import split_indices, train_classifier
    from orw_fast.tasks.demo import DigitsQuality, held_out_digits

    images, labels = load_digits_dataset()
    classifier = DigitClassifier()
    torch.manual_seed(0)
    train_classifier(classifier, images, labels, epochs=3, progress=False)
    quality = DigitsQuality(classifier)
    assert quality.real_features.shape == (held_out_digits().shape[0], 128) == (359, 128)
    real = images[split_indices(images.shape[0])[0][:500]]
    noisy = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    scores = {name: quality(x) for name, x in (("real", real), ("noisy", noisy), ("blurred", blurred))}
    assert scores["real"]["background"] == 0.0 < scores["noisy"]["background"], scores
    assert scores["real"]["digits_fd"] < min(scores["noisy"]["digits_fd"], scores["blurred"]["digits_fd"]) / 1.5, scores
