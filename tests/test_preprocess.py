"""Preprocessing: per-volume statistics that ignore slice order and apply to any subset of slices."""

import numpy as np
import pytest

from napari_lgg_seg import preprocess


@pytest.mark.parametrize("mode", preprocess.MODES)
def test_slice_order_does_not_change_statistics(sample_patient, mode):
    spec = {"mode": mode, "params": {}}
    vol = sample_patient.image
    perm = np.random.default_rng(0).permutation(vol.shape[0])
    a, b = preprocess.volume_stats(vol, spec), preprocess.volume_stats(vol[perm], spec)
    for name in ("lo", "hi", "shift", "scale"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(preprocess.preprocess(vol, spec)[perm], preprocess.preprocess(vol[perm], spec))


def test_subset_of_slices_uses_the_volume_statistics(sample_patient):
    vol = sample_patient.image
    stats = preprocess.volume_stats(vol)
    whole = preprocess.normalize(vol, stats)
    np.testing.assert_array_equal(preprocess.normalize(vol[11:14], stats), whole[11:14])


def test_zscore_brain_is_standardised_on_the_brain(sample_patient):
    vol = sample_patient.image
    x = preprocess.preprocess(vol)
    brain = (vol > 0).any(-1)
    assert x.dtype == np.float32 and x.shape == vol.shape
    np.testing.assert_allclose(x[brain].mean(0), 0, atol=0.1)
    np.testing.assert_allclose(x[brain].std(0), 1, atol=0.1)


def test_dtypes_uint8_uint16_float_agree(sample_patient):
    vol = sample_patient.image[5:15]
    ref = preprocess.preprocess(vol)
    for scaled in (vol.astype(np.uint16) * 257, vol.astype(np.float32) / 255.0, vol.astype(np.float64) * 3.5):
        # z-scoring removes any linear rescaling of the intensities
        np.testing.assert_allclose(preprocess.preprocess(scaled), ref, atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown preprocessing mode 'nope'"):
        preprocess.volume_stats(np.zeros((2, 8, 8, 3), np.uint8), {"mode": "nope"})
    with pytest.raises(ValueError, match=r"expected a volume \(Z, H, W, C\)"):
        preprocess.volume_stats(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="unsupported pixel type bool"):
        preprocess.volume_stats(np.zeros((2, 8, 8, 3), bool))
