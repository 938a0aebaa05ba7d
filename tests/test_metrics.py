"""Metrics on hand-checked shapes and on a real mask."""

import math

import numpy as np
import pytest

from napari_lgg_seg import metrics


def square(z=3, lo=10, hi=20, shape=(32, 32)):
    m = np.zeros((z, *shape), np.uint8)
    m[:, lo:hi, lo:hi] = 1
    return m


def test_dice_known_values():
    a = square()
    b = square(lo=10, hi=15)  # quarter of a
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, b) == pytest.approx(2 * 75 / (300 + 75))
    assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(a, a[:2])


def test_dice_per_slice():
    a = square()
    b = a.copy()
    b[1] = 0
    np.testing.assert_allclose(metrics.dice_per_slice(a, b), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(metrics.dice_per_slice(np.zeros_like(a), np.zeros_like(a)), [1, 1, 1])


def test_hd95_shift_and_empty_cases():
    a = square(z=1, shape=(64, 64))[0]
    shifted = np.roll(a, 3, axis=1)
    assert metrics.hd95(a, shifted) == pytest.approx(3.0)
    assert metrics.hd95(a, a) == 0.0
    assert metrics.hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert math.isinf(metrics.hd95(a, np.zeros_like(a)))


def test_on_a_real_mask(sample_patient):
    truth = sample_patient.mask
    eroded = truth.copy()
    eroded[:, :, :-2] &= truth[:, :, 2:]
    d = metrics.dice(eroded, truth)
    assert 0.8 < d < 1.0
    assert 0 < metrics.hd95(eroded, truth) <= 2.0


def test_summarize():
    s = metrics.summarize([0.5, 0.7, 0.9, math.inf])
    assert s["n"] == 4 and s["n_infinite"] == 1 and s["mean"] == pytest.approx(0.7)
