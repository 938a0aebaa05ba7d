"""Intensity preprocessing shared by inference and training, recorded by name and parameters in the checkpoint.

Each mode is one function pair: ``stats = <mode>_stats(volume, **params)`` computed once over the whole volume,
and ``normalize(slices, stats)`` applied to any subset of its slices. Statistics are computed from value
histograms (integer input) or sorted values (float input), so they are exactly the same whatever the slice
order, and a batch of slices is normalised with its volume's statistics, not its own: predicting or training on
slices 12-18 gives the same input as slicing the preprocessed whole volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("zscore_brain", "buda", "unit")
DEFAULT = {"mode": "zscore_brain", "params": {"low": 0.5, "high": 99.5}}


@dataclass(frozen=True)
class VolumeStats:
    """Per-channel affine map ``(clip(x, lo, hi) - shift) / scale``."""

    lo: np.ndarray
    hi: np.ndarray
    shift: np.ndarray
    scale: np.ndarray


class _Dist:
    """An exact, order-independent view of a set of values: (sorted unique values, counts)."""

    def __init__(self, values: np.ndarray):
        values = values.ravel()
        if values.size == 0:
            values = np.zeros(1, np.float32)
        if values.dtype.kind in "ui" and values.dtype.itemsize <= 2:
            off = 0 if values.dtype.kind == "u" else int(values.min())
            counts = np.bincount(values if off == 0 else values.astype(np.int64) - off)
            nz = np.nonzero(counts)[0]
            self.v, self.c = (nz + off).astype(np.float64), counts[nz].astype(np.float64)
        else:
            self.v, self.c = np.unique(values.astype(np.float64), return_counts=True)
            self.c = self.c.astype(np.float64)

    def percentile(self, q: float) -> float:
        # 'lower' percentile: an observed value, no interpolation, so ties and order cannot matter.
        cum = np.cumsum(self.c)
        k = int(np.floor(q / 100.0 * (cum[-1] - 1)))
        return float(self.v[np.searchsorted(cum, k + 1)])

    def clipped_mean_std(self, lo: float, hi: float) -> tuple[float, float]:
        v = np.clip(self.v, lo, hi)
        n = self.c.sum()
        mean = float((v * self.c).sum() / n)
        std = float(np.sqrt(((v - mean) ** 2 * self.c).sum() / n))
        return mean, std


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"expected a volume (Z, H, W, C), got shape {volume.shape}")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise TypeError(f"unsupported pixel type {volume.dtype}: use uint8, uint16 or float")
    return volume


def zscore_brain_stats(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> VolumeStats:
    """Per channel: clip to the [low, high] percentiles of the brain (voxels where any channel exceeds the volume's
    minimum), then z-score with the clipped brain's mean and std. Background does not dilute the statistics, so
    patients with more or less air around the head map to the same scale."""
    volume = _check_volume(volume)
    # element-wise maximum over channels: ~15x faster than .any(axis=-1) and no long GIL-holding call, which
    # matters because the napari widget computes this in a worker thread
    brain = np.maximum.reduce([volume[..., c] for c in range(volume.shape[-1])]) > volume.min()
    if brain.sum() < 16:
        brain = np.ones(volume.shape[:3], bool)
    lo, hi, shift, scale = [], [], [], []
    for c in range(volume.shape[-1]):
        d = _Dist(volume[..., c][brain])
        a, b = d.percentile(low), d.percentile(high)
        m, s = d.clipped_mean_std(a, b)
        lo.append(a), hi.append(b), shift.append(m), scale.append(s if s > 1e-6 else 1.0)
    return VolumeStats(*(np.asarray(x, np.float32) for x in (lo, hi, shift, scale)))


def buda_stats(volume: np.ndarray, low: float = 10.0, high: float = 99.0) -> VolumeStats:
    """The intensity normalisation of mateuszbuda/brain-segmentation-pytorch (``normalize_volume``): rescale the
    [p10, p99] range of the whole volume (all channels) to [0, 1], then z-score each channel over all voxels."""
    volume = _check_volume(volume)
    d = _Dist(volume)
    a, b = d.percentile(low), d.percentile(high)
    span = (b - a) if b > a else 1.0
    lo, hi, shift, scale = [], [], [], []
    for c in range(volume.shape[-1]):
        m, s = _Dist(volume[..., c]).clipped_mean_std(a, b)
        lo.append(a), hi.append(b), shift.append(m), scale.append(s if s > 1e-6 else span)
    return VolumeStats(*(np.asarray(x, np.float32) for x in (lo, hi, shift, scale)))


def unit_stats(volume: np.ndarray) -> VolumeStats:
    """No per-volume statistics: integer types are divided by their maximum (255 for uint8), floats kept."""
    volume = _check_volume(volume)
    c = volume.shape[-1]
    top = float(np.iinfo(volume.dtype).max) if np.issubdtype(volume.dtype, np.integer) else 1.0
    inf = np.float32(np.inf)
    return VolumeStats(np.full(c, -inf), np.full(c, inf), np.zeros(c, np.float32), np.full(c, top, np.float32))


_STATS = {"zscore_brain": zscore_brain_stats, "buda": buda_stats, "unit": unit_stats}


def volume_stats(volume: np.ndarray, spec: dict | None = None) -> VolumeStats:
    """Statistics of ``volume`` ``(Z, H, W, C)`` for the recorded preprocessing ``spec`` (``{"mode", "params"}``)."""
    spec = spec or DEFAULT
    mode = spec.get("mode")
    if mode not in _STATS:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {', '.join(MODES)}")
    return _STATS[mode](volume, **dict(spec.get("params", {})))


def normalize(slices: np.ndarray, stats: VolumeStats) -> np.ndarray:
    """Apply a volume's statistics to some of its slices ``(..., H, W, C)``; returns float32 of the same shape."""
    x = np.asarray(slices, dtype=np.float32)
    x = np.clip(x, stats.lo, stats.hi)
    x -= stats.shift
    x /= stats.scale
    return x


def preprocess(volume: np.ndarray, spec: dict | None = None) -> np.ndarray:
    """Whole-volume preprocessing: ``normalize(volume, volume_stats(volume, spec))``."""
    return normalize(volume, volume_stats(volume, spec))
