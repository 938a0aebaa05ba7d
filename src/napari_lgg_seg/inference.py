"""Slice-by-slice U-Net inference over a volume: batched, device- and precision-aware, bounded in memory.

``iter_segment`` is a plain generator that yields :class:`Progress` and returns a :class:`Segmentation`; the
napari widget runs it in a ``thread_worker`` and the CLI and ``segment`` drive it directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import preprocess
from .checkpoint import Checkpoint
from .model import UNet

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class Cancelled(Exception):
    """The caller's cancel flag was set; nothing was returned."""


@dataclass(frozen=True)
class Progress:
    done: int  # slices finished
    total: int
    message: str = ""


@dataclass
class Segmentation:
    probabilities: np.ndarray  # (Z, H, W) float32 in [0, 1]
    labels: np.ndarray  # (Z, H, W) uint8, 1 = abnormality, after threshold and post-processing
    device: str
    precision: str
    batch_size: int  # the batch size finally used (smaller than asked after an out-of-memory retry)
    seconds: float


# ----------------------------------------------------------------------------------------- device, precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. A named device that is absent is an error, not a silent fallback."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available (use --device auto or cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"device {name!r} requested but Apple MPS is not available (use --device auto or cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    return dev


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). Without them oneDNN emulates
    bf16 and runs many times slower than fp32, so ``auto`` keeps fp32 there. Unknown platforms: False."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA that supports it, else fp16; fp16 on MPS; on the CPU bf16 (+ channels_last) only
    with native bf16 instructions, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("fp16 is not supported on the CPU; use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def prepare_model(model: UNet, device: torch.device, precision: str) -> UNet:
    """Eval mode on ``device``; channels_last where mixed precision runs (its kernels prefer it)."""
    model = model.eval().to(device)
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------- batch forward


def _forward_probs(model: UNet, x: torch.Tensor, precision: str, tta: bool, input_size, out_hw) -> torch.Tensor:
    """Normalised input ``(B, C, H, W)`` on the device -> probabilities ``(B, H, W)`` float32 on the device."""
    h, w = out_hw
    if input_size is not None and tuple(input_size) != (h, w):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    hh, ww = x.shape[-2:]
    m = model.size_multiple
    ph, pw = (-hh) % m, (-ww) % m
    if ph or pw:  # replicate the border (background) so padding adds no edges for the net to react to
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
    if precision != "fp32":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _DTYPES.get(precision)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x).float()
        if tta:  # horizontal flip: the brain is roughly left-right symmetric, lesions are not
            logits = (logits + torch.flip(model(torch.flip(x, dims=[-1])).float(), dims=[-1])) / 2
    logits = logits[:, :, ph // 2 : ph // 2 + hh, pw // 2 : pw // 2 + ww]
    if (hh, ww) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits[:, 0])


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _as_volume(volume: np.ndarray, channels: int) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim == 3 and volume.shape[-1] == channels and channels > 1 and volume.shape[0] > 4:
        volume = volume[None]  # one (H, W, C) slice
    if volume.ndim != 4 or volume.shape[-1] != channels:
        raise ValueError(f"expected a volume (Z, H, W, {channels}), got shape {volume.shape}")
    if volume.shape[0] == 0:
        raise ValueError("the volume has no slices")
    return volume


# ------------------------------------------------------------------------------------------------- post-process


def postprocess(labels: np.ndarray, keep_largest: bool = True, min_size: int = 0) -> np.ndarray:
    """Keep the largest 3D connected component (26-connected) and/or drop components under ``min_size`` voxels."""
    labels = labels.astype(np.uint8, copy=True)
    if not (keep_largest or min_size > 0) or not labels.any():
        return labels
    comp, n = ndimage.label(labels, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = sizes >= max(min_size, 1)
    if keep_largest:
        keep = np.zeros_like(keep)
        keep[int(np.argmax(sizes))] = sizes.max() >= max(min_size, 1)
    return keep[comp].astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- main


def iter_segment(
    volume: np.ndarray,
    model: Checkpoint | UNet,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    threshold: float | None = None,
    tta: bool = False,
    keep_largest: bool = True,
    min_size: int = 0,
    preprocessing: dict | None = None,
    input_size: tuple[int, int] | None = None,
    cancel=None,
) -> Iterator[Progress]:
    """Segment ``volume`` ``(Z, H, W, C)``; yields :class:`Progress` per batch and returns a :class:`Segmentation`.

    ``model`` is a :class:`Checkpoint` (its preprocessing, input size and threshold apply unless overridden) or a
    bare :class:`UNet` (then ``preprocessing`` defaults to the project default). Any H and W: slices are padded to
    what the net needs and cropped back. Only one batch is on the device at a time.
    """
    t0 = time.perf_counter()
    if isinstance(model, Checkpoint):
        ckpt = model
        net = ckpt.build_model()
        preprocessing = preprocessing or ckpt.preprocessing
        input_size = input_size or ckpt.input_size
        threshold = ckpt.threshold if threshold is None else threshold
    else:
        net = model
    threshold = 0.5 if threshold is None else float(threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    volume = _as_volume(volume, net.config.in_channels)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    net = prepare_model(net, dev, prec)
    stats = preprocess.volume_stats(volume, preprocessing)

    z = volume.shape[0]
    yield Progress(0, z, f"segmenting {z} slices on {dev.type} ({prec})")
    probs, bs = yield from iter_probabilities(net, volume, stats, dev, prec, batch_size, tta, input_size, cancel)
    labels = postprocess(probs >= threshold, keep_largest=keep_largest, min_size=min_size)
    if dev.type == "cuda":
        del net
        torch.cuda.empty_cache()
    return Segmentation(probs, labels, dev.type, prec, bs, time.perf_counter() - t0)


def iter_probabilities(net: UNet, volume: np.ndarray, stats, dev: torch.device, prec: str, batch_size: int = 16,
                       tta: bool = False, input_size=None, cancel=None):
    """The batched forward pass over a volume (model already prepared on ``dev``); yields :class:`Progress` after
    each batch and returns ``(probabilities (Z, H, W) float32, batch size used)``. Shared with training's
    validation so the DSC it reports is the DSC inference gives."""
    z, h, w = volume.shape[:3]
    probs = np.empty((z, h, w), np.float32)
    start, bs = 0, batch_size
    while start < z:
        if _is_cancelled(cancel):
            raise Cancelled("segmentation cancelled")
        stop = min(z, start + bs)
        x = torch.from_numpy(preprocess.normalize(volume[start:stop], stats)).permute(0, 3, 1, 2)
        try:
            with torch.inference_mode():  # scoped to the batch: the caller's code between yields runs normally
                probs[start:stop] = _forward_probs(net, x.to(dev), prec, tta, input_size, (h, w)).cpu().numpy()
        except _OOM:
            if bs == 1:
                raise
            bs = max(1, bs // 2)  # retry the same slices with half the batch
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start = stop
        yield Progress(start, z)
    return probs, bs


def run(gen: Iterator[Progress], progress: Callable[[Progress], None] | None = None):
    """Drive a progress generator to its end and return its return value."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(item)


def segment(volume: np.ndarray, model: Checkpoint | UNet, progress=None, **kwargs) -> Segmentation:
    """Blocking form of :func:`iter_segment`; ``progress`` is called with each :class:`Progress`."""
    return run(iter_segment(volume, model, **kwargs), progress)
