"""Segmentation metrics as used for LGG: per-volume Dice (the number reported per patient), per-slice Dice and
the 95th-percentile Hausdorff distance, in pixels."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """DSC = 2|P n T| / (|P| + |T|) over the whole array; 1.0 when both are empty."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, truth {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def dice_per_slice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each slice along axis 0 (1.0 where both are empty)."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, truth {t.shape}")
    axes = tuple(range(1, p.ndim))
    inter = np.logical_and(p, t).sum(axis=axes)
    denom = p.sum(axis=axes) + t.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th percentile of the symmetric surface distances, in pixels (voxels of unit size).

    0.0 when both are empty; ``inf`` when exactly one is empty (there is no surface to measure to).
    """
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: prediction {p.shape}, truth {t.shape}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.inf
    sp, st = _surface(p), _surface(t)
    d_to_t = ndimage.distance_transform_edt(~st)[sp]
    d_to_p = ndimage.distance_transform_edt(~sp)[st]
    return float(np.percentile(np.concatenate([d_to_t, d_to_p]), 95))


def summarize(values) -> dict:
    """Mean and median over patients (finite values only for the mean of HD95-like numbers)."""
    arr = np.asarray(list(values), dtype=float)
    finite = arr[np.isfinite(arr)]
    return {
        "n": int(arr.size),
        "mean": float(finite.mean()) if finite.size else math.nan,
        "median": float(np.median(arr)) if arr.size else math.nan,
        "n_infinite": int(arr.size - finite.size),
    }
