"""Training data: patients with masks, patient-level splits, area-weighted slice sampling and batched
augmentation on the training device.

Images stay uint8 with their volume's preprocessing statistics (a quarter of the memory of float volumes); a
batch is normalised with :func:`preprocess.normalize` and resized exactly as inference does, so training and
inference see the same input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import io, preprocess


@dataclass
class Sample:
    """One patient ready for training: uint8 image (Z,H,W,C), mask (Z,H,W) 0/1, its volume statistics, and the
    slice indices to learn from (all slices unless restricted, e.g. to the slices a user corrected)."""

    patient_id: str
    image: np.ndarray
    mask: np.ndarray
    stats: preprocess.VolumeStats
    slices: np.ndarray

    @classmethod
    def from_arrays(cls, patient_id, image, mask, preprocessing: dict, slices=None) -> "Sample":
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 4 or mask.shape != image.shape[:3]:
            raise ValueError(f"{patient_id}: image {image.shape} and mask {mask.shape} do not match (Z,H,W,C)/(Z,H,W)")
        # statistics from the whole volume, whatever slices are learned from
        stats = preprocess.volume_stats(image, preprocessing)
        sl = np.arange(image.shape[0]) if slices is None else np.asarray(sorted(set(int(s) for s in slices)))
        if sl.size == 0:
            raise ValueError(f"{patient_id}: no slices selected")
        if sl.min() < 0 or sl.max() >= image.shape[0]:
            raise ValueError(f"{patient_id}: slice indices {sl.min()}..{sl.max()} outside 0..{image.shape[0] - 1}")
        return cls(patient_id, image, (mask > 0).astype(np.uint8), stats, sl)


# ---------------------------------------------------------------------------------------------- reading, cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("LGG_SEG_CACHE", Path.home() / ".cache" / "napari-lgg-seg"))


def _cache_key(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.glob("*.tif*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_cached(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> io.Patient:
    """:func:`io.read_patient` with a cache of the decoded arrays (decoding JPEG-XL costs ~28 ms a slice).

    The cache lives outside the data folder (``$LGG_SEG_CACHE`` or ``~/.cache/napari-lgg-seg``), keyed by file
    names, sizes and times, so edited masks are read again."""
    folder = Path(folder)
    if cache_dir is False:
        return io.read_patient(folder)
    cache = Path(cache_dir or default_cache_dir())
    path = cache / f"{folder.name}-{_cache_key(folder)}.npz"
    if path.is_file():
        with np.load(path) as z:
            mask = z["mask"] if z["mask"].size else None
            return io.Patient(str(z["patient_id"]), z["image"], mask, folder)
    patient = io.read_patient(folder)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, patient_id=patient.patient_id, image=patient.image,
             mask=patient.mask if patient.mask is not None else np.zeros(0, np.uint8))
    os.replace(tmp, path)
    return patient


def load_samples(folders, preprocessing: dict, cache_dir=None) -> list[Sample]:
    out = []
    for f in folders:
        p = read_cached(f, cache_dir)
        if p.mask is None:
            raise io.LGGFormatError(f"{f}: no mask files; training needs <patient>_<n>_mask.tif for every slice")
        out.append(Sample.from_arrays(p.patient_id, p.image, p.mask, preprocessing))
    return out


def split_patients(folders: list[Path], split_file=None, val_patients: int | None = None, seed: int = 0):
    """(train folders, val folders): by a split file ``{"train": [...], "val": [...]}`` or ``val_patients``
    random patients (seeded). Patients are never split across the two."""
    by_name = {Path(f).name: Path(f) for f in folders}
    if split_file is not None:
        spec = json.loads(Path(split_file).read_text())
        if not {"train", "val"} <= set(spec):
            raise ValueError(f"{split_file}: a split file needs 'train' and 'val' lists")
        missing = [p for p in spec["train"] + spec["val"] if p not in by_name]
        if missing:
            raise io.LGGFormatError(f"{split_file}: patient {missing[0]} is not in the data ({len(missing)} missing)")
        overlap = set(spec["train"]) & set(spec["val"])
        if overlap:
            raise ValueError(f"{split_file}: patients in both train and val: {sorted(overlap)[:3]}")
        return [by_name[p] for p in spec["train"]], [by_name[p] for p in spec["val"]]
    names = sorted(by_name)
    n = 0 if val_patients is None else int(val_patients)
    if n < 0 or n >= len(names):
        raise ValueError(f"--val-patients must be between 0 and {len(names) - 1}, got {n}")
    rng = np.random.default_rng(seed)
    val = set(rng.choice(names, size=n, replace=False).tolist()) if n else set()
    return [by_name[p] for p in names if p not in val], [by_name[p] for p in names if p in val]


def parse_slices(text: str | None, n_slices: int) -> list[int] | None:
    """'12-18,22' (1-based, inclusive, as users count slices) -> 0-based indices; None -> None (all)."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise ValueError(f"slices: cannot read {part!r} (use e.g. 12-18,22)") from None
        if lo < 1 or hi > n_slices or lo > hi:
            raise ValueError(f"slices: {part!r} outside 1..{n_slices}")
        out.update(range(lo - 1, hi))
    return sorted(out)


# -------------------------------------------------------------------------------------------------- sampling


def slice_weights(areas: np.ndarray) -> np.ndarray:
    """The tutorial's rule: weight = (area + 0.1 x total / N) / (1.1 x total), so slices with more abnormality are
    drawn more often and empty slices keep a floor; weights sum to 1 (uniform when no slice has abnormality)."""
    areas = np.asarray(areas, dtype=np.float64)
    total, n = areas.sum(), areas.size
    if total == 0:
        return np.full(n, 1.0 / n)
    return (areas + 0.1 * total / n) / (1.1 * total)


class SliceIndex:
    """All trainable (patient, slice) pairs of a list of samples, with their sampling weights."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples
        self.pairs = np.array([(i, z) for i, s in enumerate(samples) for z in s.slices], dtype=np.int64).reshape(-1, 2)
        if len(self.pairs) == 0:
            raise ValueError("no training slices")
        areas = np.array([samples[i].mask[z].sum() for i, z in self.pairs], dtype=np.float64)
        self.weights = slice_weights(areas)

    def __len__(self) -> int:
        return len(self.pairs)

    def draw(self, n: int, generator: torch.Generator) -> np.ndarray:
        """``n`` pair indices drawn with replacement by weight."""
        w = torch.from_numpy(self.weights)
        return torch.multinomial(w, n, replacement=True, generator=generator).numpy()

    def batch(self, idx: np.ndarray, input_size=None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B,C,h,w) and masks (B,1,h,w) for pair indices, resized as inference resizes."""
        xs, ys = [], []
        for i, z in self.pairs[idx]:
            s = self.samples[i]
            xs.append(preprocess.normalize(s.image[z], s.stats))
            ys.append(s.mask[z])
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).to(device)
        y = torch.from_numpy(np.stack(ys)).float()[:, None].to(device)
        return resize_pair(x, y, input_size)


def resize_pair(x: torch.Tensor, y: torch.Tensor, input_size):
    if input_size is not None and tuple(input_size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
        y = F.interpolate(y, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    return x, y


# ---------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """Random scale, rotation and horizontal flip, drawn per slice and applied to image and mask with one
    sampling grid (so they cannot drift apart), batched on the training device."""

    scale: float = 0.05  # +-5 %
    rotate: float = 15.0  # +-15 degrees
    flip: bool = True
    enabled: bool = True

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, background=None):
        if not self.enabled:
            return x, y
        b = x.shape[0]
        u = torch.rand(b, 3, generator=generator)  # on the CPU, so results do not depend on the device's RNG
        scale = 1.0 + (2 * u[:, 0] - 1) * self.scale
        angle = (2 * u[:, 1] - 1) * math.radians(self.rotate)
        flip = torch.where((u[:, 2] < 0.5) & torch.tensor(self.flip), -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
        theta = theta.to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # outside the slice is background: shift so background is 0, sample with zero padding, shift back
        bg = x.amin(dim=(2, 3), keepdim=True) if background is None else background
        x = F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x, y
