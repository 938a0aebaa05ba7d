"""napari reader: LGG patient folders, LGG slice files, and TIFF stacks (images or masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io

META_KEY = "lgg"  # layer.metadata[META_KEY]: patient id, role, channel, source paths


def _is_mask_name(path: Path) -> bool:
    return path.stem.lower().endswith("mask")


def get_reader(path):
    """Return a reader for LGG patient folders and TIFF files, or ``None`` (npe2 offers every folder to readers)."""
    if isinstance(path, list):
        return reader_function if path and all(get_reader(p) is not None for p in path) else None
    p = Path(path)
    if p.is_dir():
        return reader_function if io.is_patient_folder(p) else None
    if p.suffix.lower() in io.TIFF_SUFFIXES and p.is_file():
        return reader_function
    return None


def reader_function(path):
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in map(Path, paths):
        if p.is_file() and _is_mask_name(p):
            layers.append(_mask_file_layer(p))
        else:
            layers.extend(patient_layers(io.read_any(p)))
    return layers


def _mask_file_layer(path: Path):
    data = io.read_stack(path)
    if data.ndim == 4:
        data = data[..., 0]
    values = set(np.unique(data).tolist())
    if not values <= {0, 1, 255}:
        raise io.LGGFormatError(f"{path}: named as a mask but holds values {sorted(values)[:8]} (expected 0/255)")
    meta = {META_KEY: {"patient_id": path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem,
                       "role": "truth", "source": str(path)}}
    return (data > 0).astype(np.uint8), {"name": path.stem, "metadata": meta}, "labels"


def patient_layers(patient: io.Patient) -> list:
    """Three grayscale layers named by sequence (FLAIR visible) plus the dataset's mask as Labels when present."""
    pid = patient.patient_id
    common = {"patient_id": pid, "source": str(patient.source) if patient.source else None}
    layers = []
    for c, name in enumerate(io.CHANNELS):
        meta = {META_KEY: {**common, "role": "image", "channel": name, "channel_index": c,
                           "paths": [str(p) for p in patient.image_paths]}}
        kwargs = {"name": f"{pid} {name}", "colormap": "gray", "visible": name == "FLAIR", "metadata": meta}
        if patient.image.dtype == np.uint8:
            kwargs["contrast_limits"] = (0, 255)
        layers.append((patient.image[..., c], kwargs, "image"))
    if patient.mask is not None:
        meta = {META_KEY: {**common, "role": "truth", "paths": [str(p) for p in patient.mask_paths]}}
        layers.append((patient.mask, {"name": f"{pid} mask", "metadata": meta, "opacity": 0.5}, "labels"))
    return layers
