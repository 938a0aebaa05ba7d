"""Checkpoints: a state dict plus everything needed to use it, in plain tensors and builtins only, so that
``torch.load(..., weights_only=True)`` reads it without running any code from the file."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import preprocess
from .io import CHANNELS
from .model import UNet, UNetConfig, buda_config_from_state_dict, from_buda_state_dict, is_buda_state_dict

FORMAT = "napari-lgg-seg/checkpoint"
BUILTIN_FILE = Path(__file__).parent / "models" / "lgg_fast128.pt"  # trained by the project, see MODEL_CARD.md
VERSION = 1


class CheckpointError(ValueError):
    """A file is not a usable checkpoint; the message names the file and how to fix it."""


@dataclass
class Checkpoint:
    state_dict: dict
    config: UNetConfig
    preset: str | None = None
    channels: tuple[str, ...] = CHANNELS
    preprocessing: dict = field(default_factory=lambda: copy.deepcopy(preprocess.DEFAULT))
    input_size: tuple[int, int] | None = None  # (H, W) the net runs at; slices are resized to it and back
    threshold: float = 0.5
    training: dict = field(default_factory=dict)  # data, epochs, metrics... when known
    parent: str | None = None  # the checkpoint this one was fine-tuned from
    source: str | None = None  # the file it was loaded from (not saved)

    @classmethod
    def from_model(cls, model: UNet, preset: str | None = None, **kwargs) -> "Checkpoint":
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(state_dict=state, config=model.config, preset=preset, **kwargs)

    def build_model(self) -> UNet:
        model = UNet(self.config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        model.load_state_dict(state)
        model.eval()
        return model

    def to_dict(self, half: bool = False) -> dict:
        state = self.state_dict
        if half:  # fp16 storage halves the file; weights are cast back to fp32 on load
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        return {
            "format": FORMAT,
            "version": VERSION,
            "state_dict": state,
            "model": {"architecture": "unet", "preset": self.preset, "config": self.config.to_dict()},
            "channels": list(self.channels),
            "preprocessing": copy.deepcopy(self.preprocessing),
            "input_size": list(self.input_size) if self.input_size else None,
            "threshold": float(self.threshold),
            "training": copy.deepcopy(self.training),
            "parent": self.parent,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "Checkpoint":
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a napari-lgg-seg checkpoint (format {d.get('format')!r})")
        if d.get("version", 0) > VERSION:
            raise CheckpointError(f"{source}: checkpoint version {d['version']} is newer than this plugin reads "
                                  f"({VERSION}); upgrade napari-lgg-seg")
        pre = d["preprocessing"]
        if pre.get("mode") not in preprocess.MODES:
            raise CheckpointError(f"{source}: unknown preprocessing mode {pre.get('mode')!r}")
        return cls(
            state_dict=d["state_dict"],
            config=UNetConfig.from_dict(d["model"]["config"]),
            preset=d["model"].get("preset"),
            channels=tuple(d.get("channels", CHANNELS)),
            preprocessing=pre,
            input_size=tuple(d["input_size"]) if d.get("input_size") else None,
            threshold=float(d.get("threshold", 0.5)),
            training=d.get("training") or {},
            parent=d.get("parent"),
            source=source,
        )


_PICKLED_MODEL_HELP = (
    "{path}: holds a pickled whole model (as torch.save(model) writes), which cannot be loaded safely with "
    "weights_only=True. Convert it once, in a session where you trust the file:\n"
    "    import torch; from napari_lgg_seg import checkpoint, model\n"
    "    m = torch.load('{path}', weights_only=False)\n"
    "    ckpt = checkpoint.Checkpoint(m.state_dict(), model.PRESETS['<preset>'], preset='<preset>')\n"
    "    checkpoint.save(ckpt, 'converted.pt')\n"
    "(a model saved from R torch: save model$state_dict() instead of the model, then convert the same way)."
)


def save(ckpt: Checkpoint, path: str | os.PathLike, overwrite: bool = False, half: bool = False) -> Path:
    """Write atomically (temporary name, then rename); refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt.to_dict(half=half), tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint with ``weights_only=True``.

    Also accepts the state dict published by mateuszbuda/brain-segmentation-pytorch (``unet.pt``), which becomes
    the ``buda`` preset with that project's intensity normalisation. A pickled whole model is refused with the
    recipe to convert it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # the file names Python classes: a pickled model, not weights
            raise CheckpointError(_PICKLED_MODEL_HELP.format(path=path)) from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0][:200]})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        ckpt = Checkpoint.from_dict(obj, source=str(path))
    elif is_buda_state_dict(obj):
        ckpt = Checkpoint(
            state_dict=from_buda_state_dict(obj),
            config=buda_config_from_state_dict(obj),
            preset="buda",
            preprocessing={"mode": "buda", "params": {"low": 10.0, "high": 99.0}},
            training={"source": "mateuszbuda/brain-segmentation-pytorch state dict"},
            source=str(path),
        )
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: a bare state dict without the model settings and preprocessing; wrap it with "
            "napari_lgg_seg.checkpoint.Checkpoint(state_dict, config, preset=...) and checkpoint.save()"
        )
    else:
        raise CheckpointError(f"{path}: not a napari-lgg-seg checkpoint (no 'format' entry)")
    try:
        ckpt.build_model()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded model settings ({exc})") from exc
    return ckpt



def has_builtin() -> bool:
    return BUILTIN_FILE.is_file()


_BUILTIN_CACHE: list[Checkpoint] = []


def load_builtin() -> Checkpoint:
    """The model shipped inside the package (offline; ``weights_only=True``). A fresh copy each call, so callers
    that fine-tune or move it never change what others get."""
    if not has_builtin():
        raise CheckpointError(f"{BUILTIN_FILE}: the built-in model is missing from this installation; pass --model")
    if not _BUILTIN_CACHE:
        _BUILTIN_CACHE.append(load(BUILTIN_FILE))
    ckpt = copy.copy(_BUILTIN_CACHE[0])
    ckpt.source = "built-in"
    return ckpt


def load_or_builtin(path) -> Checkpoint:
    """``load(path)``, or the built-in model when ``path`` is None."""
    return load_builtin() if path is None else load(path)
