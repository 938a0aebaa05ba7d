"""napari writers for Labels layers: LGG mask slices in a folder, or one multi-page TIFF (both uint8 0/255)."""

from __future__ import annotations

from pathlib import Path

from . import io
from ._reader import META_KEY


def _patient_id(path: Path, meta: dict) -> str:
    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    return info.get("patient_id") or path.name


def write_mask_folder(path: str, data, meta: dict) -> list[str]:
    """Write ``<patient>_<n>_mask.tif`` for every slice into the folder ``path``; never replaces existing masks."""
    folder = Path(path)
    written = io.write_masks(data, folder, _patient_id(folder, meta), overwrite=False)
    return [str(p) for p in written]


def write_mask_tiff(path: str, data, meta: dict) -> list[str]:
    """Write the label volume as one multi-page TIFF; never replaces an existing file (napari's own save calls
    reach writers without asking, so the writer refuses rather than guess consent)."""
    return [str(io.write_mask_stack(data, path, overwrite=False))]
