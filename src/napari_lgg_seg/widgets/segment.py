"""The "Segment tumor (U-Net)" dock widget: a thin napari layer over :mod:`napari_lgg_seg.inference`.

The work is :func:`inference.iter_segment`, a plain generator; the widget gathers its inputs on the main thread,
runs it in a ``thread_worker`` and applies the result on the main thread. Tests drive ``make_job`` without threads.
"""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import numpy as np
from magicgui import widgets
from napari.layers import Image, Labels
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

from .. import checkpoint, inference, io, metrics
from .._reader import META_KEY
from ._worker import start_job

RECORD_KEY = "lgg_seg_prediction"  # Labels.metadata[RECORD_KEY]: what the widget last wrote, to find user edits


def _info(layer) -> dict:
    return layer.metadata.get(META_KEY) or {}


def find_patients(viewer) -> dict[str, dict[int, Image]]:
    """Patients opened by the reader: patient id -> {channel index: image layer}, complete ones only."""
    found: dict[str, dict[int, Image]] = {}
    for layer in viewer.layers:
        info = _info(layer)
        if isinstance(layer, Image) and info.get("role") == "image" and "channel_index" in info:
            found.setdefault(info["patient_id"], {})[info["channel_index"]] = layer
    return {pid: ch for pid, ch in found.items() if len(ch) == len(io.CHANNELS)}


def input_choices(viewer) -> list[tuple[str, tuple]]:
    """Choices of the input box: reader patients first (newest first), then RGB layers, then FLAIR-only layers."""
    choices = [(f"patient {pid} (3 sequences)", ("patient", pid)) for pid in reversed(list(find_patients(viewer)))]
    for layer in viewer.layers:
        if not isinstance(layer, Image):
            continue
        if layer.rgb:
            choices.append((f"RGB layer '{layer.name}'", ("rgb", layer.name)))
        elif _info(layer).get("role") != "image" or _info(layer).get("channel") == "FLAIR":
            choices.append((f"FLAIR-only layer '{layer.name}'", ("flair", layer.name)))
    return choices


def gather_input(viewer, choice: tuple) -> tuple[str, np.ndarray]:
    """(patient id, volume (Z, H, W, 3)) for an input choice; data is copied so the worker never reads a layer."""
    kind, key = choice
    if kind == "patient":
        layers = find_patients(viewer).get(key)
        if not layers:
            raise ValueError(f"patient {key} is no longer open (its three sequence layers are needed)")
        return key, np.stack([np.asarray(layers[c].data) for c in range(len(io.CHANNELS))], axis=-1)
    layer = viewer.layers[key]
    pid = _info(layer).get("patient_id") or layer.name
    data = np.asarray(layer.data)
    if kind == "rgb":
        if data.ndim == 3:
            data = data[None]
        if data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(f"layer '{key}': expected RGB data (Z, H, W, 3), got {data.shape}")
        return pid, data
    if data.ndim == 2:
        data = data[None]
    return pid, io.flair_to_rgb(f"layer '{key}'", data)


def truth_layer(viewer, patient_id: str) -> Labels | None:
    for layer in viewer.layers:
        if isinstance(layer, Labels) and _info(layer).get("role") == "truth" and _info(layer).get("patient_id") == patient_id:
            return layer
    return None


def apply_prediction(viewer, patient_id: str, labels: np.ndarray) -> tuple[Labels, list[int]]:
    """Show ``labels`` as "<patient> prediction", updating the widget's own layer in place but never replacing a
    slice the user edited since the last prediction. Returns the layer and the kept (edited) slice indices."""
    name = f"{patient_id} prediction"
    layer = viewer.layers[name] if name in viewer.layers else None
    record = layer.metadata.get(RECORD_KEY) if isinstance(layer, Labels) else None
    if layer is None or record is None or np.shape(record) != labels.shape:
        meta = {RECORD_KEY: labels.copy(), META_KEY: {"patient_id": patient_id, "role": "prediction"}}
        new = viewer.add_labels(labels.copy(), name=name, opacity=0.6, metadata=meta)  # napari makes names unique
        return new, []
    current = np.asarray(layer.data)
    edited = np.any(current != record, axis=(1, 2))
    data = current.copy()
    data[~edited] = labels[~edited]
    layer.data = data
    record = record.copy()
    record[~edited] = labels[~edited]  # edited slices keep the old record, so they stay marked as the user's
    layer.metadata[RECORD_KEY] = record
    return layer, np.flatnonzero(edited).tolist()


_FROZEN = False
_INSTANCES: "weakref.WeakSet[SegmentWidget]" = weakref.WeakSet()


def _unwrap(obj):
    """napari hands plugins proxies of its objects; compare the objects behind them."""
    return getattr(obj, "__wrapped__", obj)


def _freeze_long_lived_objects() -> None:
    """Move the objects napari has built so far out of the cyclic garbage collector's sight, once.

    A full (generation 2) collection walks every container object of the process: with napari loaded that takes
    ~200 ms on a small CPU and, holding the GIL, stalls the event loop while a worker thread segments (measured in
    benchmarks/bench_responsiveness.py). Frozen objects are still freed by reference counting; only cycles among
    them are no longer collected, so collect first.
    """
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


class SegmentWidget(widgets.Container):
    """Dock widget: choose a patient or layer and a checkpoint, then Segment (Cancel stops it)."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.input = widgets.ComboBox(label="input", choices=self._choices)
        sources = (["built-in"] if checkpoint.has_builtin() else []) + ["file"]
        self.model_source = widgets.ComboBox(label="model", choices=sources, value=sources[0])
        self.model_path = widgets.FileEdit(label="model file", mode="r", filter="Checkpoints (*.pt *.pth)")
        self.device = widgets.ComboBox(label="device", choices=list(inference.DEVICES), value="auto")
        self.precision = widgets.ComboBox(label="precision", choices=list(inference.PRECISIONS), value="auto")
        self.batch_size = widgets.SpinBox(label="batch size", value=16, min=1, max=512)
        self.threshold = widgets.FloatSpinBox(label="threshold", value=0.5, min=0.01, max=0.99, step=0.05)
        self.tta = widgets.CheckBox(text="flip test-time augmentation", value=False)
        self.keep_largest = widgets.CheckBox(text="keep largest 3D component", value=True)
        self.min_size = widgets.SpinBox(label="min size (voxels)", value=0, min=0, max=10_000_000)
        self.show_probability = widgets.CheckBox(text="show probability map", value=False)
        self.run_button = widgets.PushButton(text="Segment")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        self.status = widgets.Label(value="")
        self.extend([self.input, self.model_source, self.model_path, self.device, self.precision, self.batch_size, self.threshold,
                     self.tta, self.keep_largest, self.min_size, self.show_probability,
                     widgets.Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                                       labels=False),
                     self.status])
        _freeze_long_lived_objects()
        _INSTANCES.add(self)
        self.checkpoint: checkpoint.Checkpoint | None = None  # the model the next run uses
        self._loaded_from: tuple | None = None
        self._cancel = threading.Event()
        self.worker = None
        self.model_path.changed.connect(self._on_model_path)
        self.model_source.changed.connect(self._on_model_source)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removed.connect(lambda e: self.input.reset_choices())

    @classmethod
    def for_viewer(cls, viewer) -> "SegmentWidget | None":
        """The Segment widget open in ``viewer`` (the fine-tune widget hands its model over to it)."""
        target = _unwrap(viewer)
        return next((w for w in list(_INSTANCES) if _unwrap(w.viewer) is target), None)

    # ----------------------------------------------------------------------------------------- inputs, model

    def _choices(self, _widget=None):
        return input_choices(self.viewer)

    def _on_layer_inserted(self, event) -> None:
        self.input.reset_choices()
        info = _info(event.value)
        if info.get("role") == "image" and info.get("patient_id") in find_patients(self.viewer):
            # a patient just opened with the reader becomes the input, so Segment does the right thing at once
            self.input.value = ("patient", info["patient_id"])

    def _on_model_source(self, _=None) -> None:
        self._loaded_from = None
        if self.model_source.value == "built-in" or Path(self.model_path.value).is_file():
            self._on_model_path()

    def _on_model_path(self, _=None) -> None:
        self._loaded_from = None  # the user chose a file: load it, even over a model handed over in memory
        if self.model_source.value != "file" and Path(self.model_path.value).is_file():
            with self.model_source.changed.blocked():
                self.model_source.value = "file"
        try:
            ckpt = self.load_model()
        except Exception as exc:  # shown to the user; the previous model stays in use
            self.status.value = f"model not loaded: {exc}"
            return
        self.threshold.value = ckpt.threshold

    def set_checkpoint(self, ckpt: checkpoint.Checkpoint) -> None:
        """Use ``ckpt`` for the next runs (the fine-tune widget hands its result over here)."""
        self.checkpoint = ckpt
        src = Path(ckpt.source) if ckpt.source else None
        if src is not None and src.is_file():
            with self.model_path.changed.blocked(), self.model_source.changed.blocked():
                self.model_path.value = src
                self.model_source.value = "file"
            self._loaded_from = (str(src), src.stat().st_mtime_ns)
        else:
            with self.model_source.changed.blocked():
                self.model_source.value = "file"  # not the built-in: the handed-over model in memory
            self._loaded_from = ("memory", id(ckpt))
        self.threshold.value = ckpt.threshold

    def load_model(self) -> checkpoint.Checkpoint:
        if self.model_source.value == "built-in":
            if self._loaded_from != ("built-in",):
                self.checkpoint = checkpoint.load_builtin()
                self._loaded_from = ("built-in",)
            return self.checkpoint
        path = Path(self.model_path.value)
        if path.is_file():
            key = (str(path), path.stat().st_mtime_ns)
            handed_over = self._loaded_from is not None and self._loaded_from[0] == "memory"
            if self._loaded_from is None or (key != self._loaded_from and not handed_over):
                self.checkpoint = checkpoint.load(path)
                self._loaded_from = key
        if self.checkpoint is None:
            raise ValueError("choose a model checkpoint file (.pt)")
        return self.checkpoint

    # ------------------------------------------------------------------------------------------------ work

    def make_job(self):
        """Collect inputs on the main thread; return (patient id, generator) for :func:`inference.iter_segment`."""
        if self.input.value is None:
            raise ValueError("no input: open an LGG patient or add an image layer first")
        pid, volume = gather_input(self.viewer, self.input.value)
        ckpt = self.load_model()
        self._cancel = threading.Event()
        job = inference.iter_segment(
            volume, ckpt, device=self.device.value, precision=self.precision.value,
            batch_size=self.batch_size.value, threshold=self.threshold.value, tta=self.tta.value,
            keep_largest=self.keep_largest.value, min_size=self.min_size.value, cancel=self._cancel,
        )
        return pid, job

    def show_probabilities(self, patient_id: str, probabilities: np.ndarray) -> None:
        name = f"{patient_id} probability"
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            self.viewer.layers[name].data = probabilities
        else:
            self.viewer.add_image(probabilities, name=name, colormap="magma", blending="additive",
                                  contrast_limits=(0, 1), visible=True)

    def apply_result(self, patient_id: str, result: inference.Segmentation, defer_probabilities=False) -> Labels:
        """Show the result (main thread). Adding a layer costs ~70 ms here; with ``defer_probabilities`` the
        probability layer is added in a later event-loop turn so the two never stall napari together."""
        layer, kept = apply_prediction(self.viewer, patient_id, result.labels)
        if self.show_probability.value:
            if defer_probabilities:
                QTimer.singleShot(0, lambda: self.show_probabilities(patient_id, result.probabilities))
            else:
                self.show_probabilities(patient_id, result.probabilities)
        msg = f"{patient_id}: {result.labels.shape[0]} slices in {result.seconds:.1f}s ({result.device}, {result.precision})"
        if kept:
            msg += f"; kept your edits on slices {', '.join(str(z + 1) for z in kept)}"
        truth = truth_layer(self.viewer, patient_id)
        if truth is not None and np.shape(truth.data) == layer.data.shape:
            self.last_dice = metrics.dice(np.asarray(layer.data), np.asarray(truth.data))
            msg += f"\nDice vs '{truth.name}': {self.last_dice:.3f}"
        self.status.value = msg
        return layer

    def start(self, _=None):
        """Run in a worker thread with napari's progress bar; returns the worker."""
        if self.worker is not None:
            return self.worker
        try:
            pid, job = self.make_job()
        except Exception as exc:
            self.status.value = f"cannot segment: {exc}"
            show_error(f"Segment tumor: {exc}")
            return None
        bar = napari_progress(total=0, desc=f"Segmenting {pid}")

        cancel = self._cancel

        def on_yield(p: inference.Progress):
            if bar.total != p.total:
                bar.total = p.total
            bar.update(p.done - bar.n)
            if not cancel.is_set():
                self.status.value = p.message or f"{pid}: {p.done}/{p.total} slices"

        def on_return(result):
            if result is None:
                self.status.value = f"{pid}: cancelled; layers unchanged"
                show_info("Segmentation cancelled")
            else:
                self.apply_result(pid, result, defer_probabilities=True)

        def on_error(exc):
            self.status.value = f"{pid}: failed: {exc}"
            show_error(f"Segment tumor: {exc}")

        return start_job(self, job, self.run_button, self.cancel_button, on_yield=on_yield, on_return=on_return,
                         on_error=on_error, on_finish=bar.close)

    def cancel(self, _=None) -> None:
        self._cancel.set()  # checked between batches; the running batch finishes first
