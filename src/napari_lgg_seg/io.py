"""Reading and writing LGG data in the layout of Kaggle's ``lgg-mri-segmentation`` (``kaggle_3m``).

A patient folder ``TCGA_<inst>_<id>_<date>/`` holds ``<patient>_<n>.tif`` (256x256x3 uint8 RGB: pre-contrast,
FLAIR, post-contrast) and ``<patient>_<n>_mask.tif`` (256x256 uint8, 0/255) for n = 1..N in anatomical order.
Every fault is reported with the file it concerns; nothing is silently reordered, dropped or overwritten.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
TIFF_SUFFIXES = (".tif", ".tiff")
_SLICE_RE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


class LGGFormatError(ValueError):
    """A file or folder does not follow the LGG layout; the message names the file and the fault."""


class NotAnLGGFolder(LGGFormatError):
    """A folder holds no LGG slice files at all (readers use this to decline the folder)."""


@dataclass
class Patient:
    """One patient: an image volume ``(Z, H, W, 3)`` uint8 and, when masks exist, labels ``(Z, H, W)`` uint8 0/1."""

    patient_id: str
    image: np.ndarray
    mask: np.ndarray | None = None
    source: Path | None = None
    image_paths: list[Path] = field(default_factory=list)
    mask_paths: list[Path] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])


def _read_tiff(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types; the user needs the file and the cause
        raise LGGFormatError(f"{path}: cannot be read as a TIFF ({type(exc).__name__}: {exc})") from exc


def _check_image_slice(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise LGGFormatError(
            f"{path}: expected an RGB slice of shape (H, W, 3) (pre-contrast, FLAIR, post-contrast), got {arr.shape}"
        )
    if arr.dtype != np.uint8:
        raise LGGFormatError(f"{path}: expected uint8 pixels, got {arr.dtype}")
    return arr


def _to_binary_mask(path: Path, arr: np.ndarray) -> np.ndarray:
    """Dataset masks are 0/255; 0/1 and RGB masks with equal channels are accepted too."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise LGGFormatError(f"{path}: mask has colour channels that differ; expected a single-channel mask")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise LGGFormatError(f"{path}: expected a mask of shape (H, W), got {arr.shape}")
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 1, 255}:
        raise LGGFormatError(f"{path}: mask values must be 0/255 (or 0/1), found {values[:8].tolist()}")
    return (arr > 0).astype(np.uint8)


def _read_many(paths: list[Path], check) -> list[np.ndarray]:
    # Decoding JPEG-XL releases the GIL, so threads give a near-linear speed-up on small machines.
    def one(p: Path) -> np.ndarray:
        return check(p, _read_tiff(p))

    if len(paths) <= 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def _stack_same_size(paths: list[Path], arrays: list[np.ndarray], what: str) -> np.ndarray:
    ref = arrays[0].shape[:2]
    for p, a in zip(paths, arrays):
        if a.shape[:2] != ref:
            raise LGGFormatError(f"{p}: {what} is {a.shape[0]}x{a.shape[1]}, but {paths[0].name} is {ref[0]}x{ref[1]}")
    return np.stack(arrays)


def scan_patient_folder(folder: str | os.PathLike, masks_only: bool = False) -> tuple[str, list[Path], list[Path]]:
    """Return ``(patient_id, image_paths, mask_paths)`` in slice order 1..N, checking the layout.

    ``mask_paths`` is empty when the folder has no masks; with ``masks_only`` (a folder of predicted masks, as
    ``lgg-seg predict`` writes) images are ignored and ``image_paths`` is empty. Raises :class:`NotAnLGGFolder` when the folder holds no
    LGG slice files, :class:`LGGFormatError` for a layout fault (named file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotAnLGGFolder(f"{folder}: not a folder")
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    prefixes: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.suffix.lower() not in TIFF_SUFFIXES or not entry.is_file():
            continue
        m = _SLICE_RE.match(entry.name)
        if m is None:
            if prefixes:
                raise LGGFormatError(f"{entry}: not an LGG slice name (<patient>_<n>.tif or <patient>_<n>_mask.tif)")
            continue
        prefixes.setdefault(m["patient"], entry)
        (masks if m["mask"] else images)[int(m["n"])] = entry
    if not prefixes:
        raise NotAnLGGFolder(f"{folder}: no LGG slice files (<patient>_<n>.tif) found")
    if len(prefixes) > 1:
        a, b = list(prefixes.values())[:2]
        raise LGGFormatError(f"{folder}: slices of more than one patient ({a.name} and {b.name})")
    patient_id = next(iter(prefixes))
    if masks_only:
        if not masks:
            raise LGGFormatError(f"{folder}: no mask files (<patient>_<n>_mask.tif)")
        numbers = _check_numbering(folder, patient_id, masks, "_mask")
        return patient_id, [], [masks[n] for n in numbers]
    for n, p in sorted(masks.items()):
        if n not in images:
            raise LGGFormatError(f"{p}: mask without its image {patient_id}_{n}.tif")
    if not images:
        raise LGGFormatError(f"{folder}: only mask files, no image slices")
    numbers = _check_numbering(folder, patient_id, images, "")
    if masks and len(masks) != len(images):
        n = next(n for n in numbers if n not in masks)
        raise LGGFormatError(f"{folder / f'{patient_id}_{n}_mask.tif'}: missing mask (other slices have masks)")
    return patient_id, [images[n] for n in numbers], [masks[n] for n in numbers] if masks else []


def _check_numbering(folder: Path, patient_id: str, files: dict[int, Path], suffix: str) -> list[int]:
    numbers = sorted(files)
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        if missing:
            name = f"{patient_id}_{missing[0]}{suffix}.tif"
            raise LGGFormatError(f"{folder / name}: missing slice (slices run 1..{max(numbers)})")
        raise LGGFormatError(f"{files[numbers[0]]}: slice numbers must start at 1")
    return numbers


def is_patient_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding LGG slice files (it may still have layout faults)."""
    try:
        scan_patient_folder(path)
    except NotAnLGGFolder:
        return False
    except LGGFormatError:
        return True
    return True


def read_patient(folder: str | os.PathLike, with_mask: bool = True) -> Patient:
    """Read a patient folder into a :class:`Patient` in numeric slice order (1..N)."""
    folder = Path(folder)
    patient_id, image_paths, mask_paths = scan_patient_folder(folder)
    image = _stack_same_size(image_paths, _read_many(image_paths, _check_image_slice), "slice")
    mask = None
    if with_mask and mask_paths:
        mask = _stack_same_size(mask_paths, _read_many(mask_paths, _to_binary_mask), "mask")
        if mask.shape != image.shape[:3]:
            raise LGGFormatError(f"{mask_paths[0]}: mask is {mask.shape[1:]}, image is {image.shape[1:3]}")
    return Patient(patient_id, image, mask, folder, image_paths, mask_paths if with_mask else [])


def read_masks(folder: str | os.PathLike) -> tuple[str, np.ndarray]:
    """``(patient_id, labels (Z, H, W) uint8 0/1)`` from the mask files of a folder (images not needed)."""
    patient_id, _, mask_paths = scan_patient_folder(folder, masks_only=True)
    return patient_id, _stack_same_size(mask_paths, _read_many(mask_paths, _to_binary_mask), "mask")


def read_slice(path: str | os.PathLike, with_mask: bool = True, _pixels: np.ndarray | None = None) -> Patient:
    """Read one slice file ``<patient>_<n>.tif`` (and its ``_mask.tif`` sibling when present) as a 1-slice patient.
    ``_pixels``: the file's pixels when the caller has already decoded them."""
    path = Path(path)
    m = _SLICE_RE.match(path.name)
    if m is None or m["mask"]:
        raise LGGFormatError(f"{path}: not an LGG image slice name (<patient>_<n>.tif)")
    image = _check_image_slice(path, _read_tiff(path) if _pixels is None else _pixels)[None]
    mask_path = path.with_name(f"{m['patient']}_{m['n']}_mask{path.suffix}")
    mask = None
    if with_mask and mask_path.exists():
        mask = _to_binary_mask(mask_path, _read_tiff(mask_path))[None]
        if mask.shape[1:] != image.shape[1:3]:
            raise LGGFormatError(f"{mask_path}: mask is {mask.shape[1:]}, image is {image.shape[1:3]}")
    return Patient(f"{m['patient']}_{m['n']}", image, mask, path, [path], [mask_path] if mask is not None else [])


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF stack: ``(Z, H, W, 3)`` RGB, ``(Z, H, W)`` single channel, or one ``(H, W, 3)`` slice.

    Returns the array with a slice axis first; 2D ``(H, W)`` becomes ``(1, H, W)``.
    """
    path = Path(path)
    arr = _read_tiff(path)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[0] > 4:
        # (H, W, 3): a single RGB slice (a 3-slice grey stack would have H > 4 as last axis)
        return arr[None]
    if arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3):
        return arr
    raise LGGFormatError(f"{path}: expected a stack of shape (Z, H, W) or (Z, H, W, 3), got {arr.shape}")


def list_patients(root: str | os.PathLike) -> list[Path]:
    """Patient folders directly under a ``kaggle_3m``-style root, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise LGGFormatError(f"{root}: not a folder")
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and is_patient_folder(p)]
    if not found:
        raise NotAnLGGFolder(f"{root}: no LGG patient folders (TCGA_<inst>_<id>_<date>/ with <patient>_<n>.tif) found")
    return found


def resolve_inputs(inputs) -> list[Path]:
    """Expand CLI inputs: patient folders stay, a ``kaggle_3m`` root becomes its patients, TIFF files stay."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise LGGFormatError(f"{p}: does not exist")
        if p.is_file():
            out.append(p)
        elif is_patient_folder(p):
            out.append(p)
        else:
            out.extend(list_patients(p))
    return out


def read_any(path: str | os.PathLike, with_mask: bool = True) -> Patient:
    """Read a patient folder, an LGG slice file or a TIFF stack as a :class:`Patient`."""
    path = Path(path)
    if path.is_dir():
        return read_patient(path, with_mask=with_mask)
    stack = read_stack(path)
    m = _SLICE_RE.match(path.name)
    if m is not None and not m["mask"] and stack.ndim == 4 and stack.shape[0] == 1:
        return read_slice(path, with_mask=with_mask, _pixels=stack[0])  # one dataset slice, with its mask sibling
    if stack.ndim == 3:
        # Single-channel stack: treat as FLAIR and fill the other channels with it, as the dataset does for missing
        # sequences.
        stack = flair_to_rgb(path, stack)
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise LGGFormatError(f"{path}: unsupported pixel type {stack.dtype}")
    return Patient(path.stem, stack, None, path, [path], [])


def flair_to_rgb(path, stack: np.ndarray) -> np.ndarray:
    """Replicate a FLAIR-only ``(Z, H, W)`` stack to the 3 channels the model expects."""
    if stack.ndim != 3:
        raise LGGFormatError(f"{path}: a FLAIR-only stack must be (Z, H, W), got {stack.shape}")
    return np.repeat(stack[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------------------- writing


def _atomic_write_tiff(path: Path, data: np.ndarray, overwrite: bool, **kwargs) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves a half-written mask."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True (CLI: --overwrite) to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, metadata=None, software=False, resolution=None, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mask_u8(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, H, W), got {labels.shape}")
    return np.where(labels > 0, 255, 0).astype(np.uint8)


def mask_paths_for(folder: str | os.PathLike, patient_id: str, n_slices: int) -> list[Path]:
    return [Path(folder) / f"{patient_id}_{n}_mask.tif" for n in range(1, n_slices + 1)]


def write_masks(labels: np.ndarray, folder: str | os.PathLike, patient_id: str, overwrite: bool = False) -> list[Path]:
    """Write ``labels`` ``(Z, H, W)`` as ``<patient>_<n>_mask.tif`` (uint8 0/255, uncompressed, as the dataset ships).

    Refuses, before writing anything, when any target exists and ``overwrite`` is false.
    """
    data = _mask_u8(labels)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = mask_paths_for(folder, patient_id, data.shape[0])
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise FileExistsError(f"{existing[0]}: exists{more}; pass overwrite=True (CLI: --overwrite) to replace")
    for p, sl in zip(paths, data):
        # 32 rows per strip, no compression, minimal tags: the layout of the dataset's own mask files.
        _atomic_write_tiff(p, sl, overwrite=True, photometric="minisblack", rowsperstrip=32)
    return paths


def write_mask_stack(labels: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``labels`` as one multi-page TIFF (uint8 0/255, one page per slice)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_tiff(path, _mask_u8(labels), overwrite=overwrite, photometric="minisblack")
    return path
