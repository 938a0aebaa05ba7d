"""The "Fine-tune on corrections" dock widget: learn from the slices a user corrected, watch it learn, and hand
the new model to the Segment widget. A thin layer over :func:`napari_lgg_seg.train.iter_finetune`.

Edits are tracked per Labels layer from napari's ``paint`` events (brush, fill, polygon, eraser), joined with
the slices that differ from what the Segment widget last wrote, so "edited slices" means the slices the user
touched since the last prediction.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from magicgui import widgets
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info

from .. import checkpoint, data, inference, train
from ._worker import start_job
from .segment import RECORD_KEY, SegmentWidget, _info, find_patients

SLICE_MODES = ("edited slices", "all slices", "listed slices")
START_MODELS = ("Segment widget's model", "built-in", "file")
VALIDATION = ("none", "hold out 25% of the selected slices")
EDITS_KEY = "lgg_seg_edited"  # Labels.metadata[EDITS_KEY]: set of slice indices painted since the last prediction


# ------------------------------------------------------------------------------------------------ edit tracking


def _slices_of_atom(atom, ndim: int) -> set[int]:
    """Slice indices (axis 0) touched by one napari Labels history atom."""
    key = getattr(atom, "slice_key", None)
    if key is not None:  # masked paint atom (napari >= 0.6): a tuple of slices / ints
        k0 = key[0] if len(key) else slice(None)
        if isinstance(k0, slice):
            return set(range(k0.start or 0, k0.stop)) if k0.stop is not None else set()
        return {int(k0)}
    if isinstance(atom, tuple) and len(atom) == 3:  # (indices, old_values, new_values)
        idx = atom[0]
        if isinstance(idx, tuple) and len(idx) == ndim:
            return {int(z) for z in np.unique(np.asarray(idx[0]))}
    return set()


def track_edits(layer: Labels) -> None:
    """Record, in ``layer.metadata[EDITS_KEY]``, the slices each paint event touches."""
    if getattr(layer, "_lgg_seg_tracked", False):
        return
    layer.metadata.setdefault(EDITS_KEY, set())

    def on_paint(event):
        if layer.ndim < 3:
            return
        for atom in event.value:
            layer.metadata.setdefault(EDITS_KEY, set()).update(_slices_of_atom(atom, layer.ndim))

    layer.events.paint.connect(on_paint)
    layer._lgg_seg_tracked = True


def edited_slices(layer: Labels) -> list[int]:
    """Slices painted since the last prediction, plus slices that differ from what the Segment widget wrote."""
    edited = set(layer.metadata.get(EDITS_KEY, set()))
    record = layer.metadata.get(RECORD_KEY)
    if record is not None and np.shape(record) == np.shape(layer.data):
        edited |= set(np.flatnonzero(np.any(np.asarray(layer.data) != record, axis=(1, 2))).tolist())
    return sorted(edited)


def labels_choices(viewer) -> list[tuple[str, str]]:
    """Labels layers of reader patients (whose three sequence layers are open), to learn from."""
    patients = find_patients(viewer)
    return [(f"{layer.name}", layer.name) for layer in viewer.layers
            if isinstance(layer, Labels) and _info(layer).get("patient_id") in patients and layer.ndim == 3]


# ------------------------------------------------------------------------------------------------------ widget


class FinetuneWidget(widgets.Container):
    """Dock widget: fine-tune the current model on corrected Labels layers and hand the result to Segment."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.layers = widgets.Select(label="learn from", choices=self._labels_choices)
        self.slice_mode = widgets.ComboBox(label="slices", choices=list(SLICE_MODES), value="edited slices")
        self.slice_list = widgets.LineEdit(label="listed (1-based)", value="", tooltip="e.g. 12-18,22")
        starts = [m for m in START_MODELS if m != "built-in" or checkpoint.has_builtin()]
        self.start_model = widgets.ComboBox(label="start from", choices=starts, value=starts[0])
        self.model_path = widgets.FileEdit(label="model file", mode="r", filter="Checkpoints (*.pt *.pth)")
        self.steps = widgets.SpinBox(label="steps", value=60, min=1, max=100_000)
        self.lr = widgets.FloatSpinBox(label="learning rate", value=3e-4, min=1e-6, max=1.0, step=1e-4)
        self.batch_size = widgets.SpinBox(label="batch size", value=8, min=1, max=256)
        self.augment = widgets.CheckBox(text="augment (scale, rotation, flip)", value=True)
        # benchmarks/bench_finetune.txt: learning only from 3 corrected slices made the model worse on the
        # patient's other slices (-0.047 DSC); also learning the other slices as the layer shows them holds it
        # in place (-0.010), so it is the default
        self.context = widgets.CheckBox(text="also learn the other slices as shown (context)", value=True)
        self.train_layers = widgets.ComboBox(label="train layers", choices=list(train.TRAIN_LAYERS), value="all")
        self.validation = widgets.ComboBox(label="validation", choices=list(VALIDATION), value=VALIDATION[1])
        self.device = widgets.ComboBox(label="device", choices=list(inference.DEVICES), value="auto")
        self.save_path = widgets.FileEdit(label="save model to", mode="w", filter="Checkpoints (*.pt)")
        self.train_button = widgets.PushButton(text="Fine-tune")
        self.cancel_button = widgets.PushButton(text="Cancel", enabled=False)
        self.again_button = widgets.PushButton(text="Segment again", enabled=False)
        self.progress = widgets.ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = widgets.Label(value="")
        self.extend([self.layers, self.slice_mode, self.slice_list, self.start_model, self.model_path, self.steps,
                     self.lr, self.batch_size, self.augment, self.context, self.train_layers, self.validation, self.device,
                     self.save_path,
                     widgets.Container(widgets=[self.train_button, self.cancel_button, self.again_button],
                                       layout="horizontal", labels=False),
                     self.progress, self.status])
        self._cancel = threading.Event()
        self.worker = None
        self.result: train.TrainResult | None = None
        self.losses: list[tuple[float, float]] = []  # (fractional round, running train loss)
        self.val_dice: list[tuple[int, float]] = []
        self._make_plot()
        self._patients_trained: list[str] = []
        self.train_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.again_button.changed.connect(self.segment_again)
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self.viewer.layers.events.removed.connect(lambda e: self.layers.reset_choices())
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                track_edits(layer)

    def _labels_choices(self, _w=None):
        return labels_choices(self.viewer)

    def _on_inserted(self, event) -> None:
        if isinstance(event.value, Labels):
            track_edits(event.value)
        self.layers.reset_choices()

    def _make_plot(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.6), dpi=90)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(111)
        self.ax_dice = self.ax_loss.twinx()
        self.native.layout().addWidget(self.canvas)
        self._redraw()

    def _redraw(self) -> None:
        ax, ax2 = self.ax_loss, self.ax_dice
        ax.clear(), ax2.clear()
        if self.losses:
            ax.plot(*zip(*self.losses), color="tab:blue", label="train loss")
        if self.val_dice:
            ax2.plot(*zip(*self.val_dice), "o-", color="tab:orange", label="val Dice")
        ax.set_xlabel("round"), ax.set_ylabel("train loss", color="tab:blue")
        ax2.set_ylabel("val Dice", color="tab:orange"), ax2.set_ylim(0, 1)
        if not getattr(self, "_laid_out", False):  # layout once: it costs more than the plot itself
            self.figure.tight_layout()
            self._laid_out = True
        self.canvas.draw_idle()

    # ------------------------------------------------------------------------------------------------ inputs

    def segment_widget(self, create: bool = True) -> SegmentWidget | None:
        w = SegmentWidget.for_viewer(self.viewer)
        if w is None and create:
            _, w = self.viewer.window.add_plugin_dock_widget("napari-lgg-seg", "Segment tumor (U-Net)")
        return w

    def starting_model(self) -> checkpoint.Checkpoint:
        if self.start_model.value == "built-in":
            return checkpoint.load_builtin()
        if self.start_model.value == "file":
            path = Path(self.model_path.value)
            if not path.is_file():
                raise ValueError("choose the model file to start from")
            return checkpoint.load(path)
        seg = self.segment_widget(create=False)
        if seg is None:
            raise ValueError("open the Segment widget and choose its model, or start from a file")
        return seg.load_model()

    def selected_slices(self, layer: Labels) -> list[int]:
        n = layer.data.shape[0]
        mode = self.slice_mode.value
        if mode == "all slices":
            return list(range(n))
        if mode == "listed slices":
            return data.parse_slices(self.slice_list.value, n) or []
        return edited_slices(layer)

    def make_samples(self, base: checkpoint.Checkpoint):
        """(train, val) lists of (patient, image, mask, slices) from the chosen Labels layers; data are copied, so
        training never changes (or races with edits to) the user's layers."""
        from .segment import gather_input

        names = list(self.layers.value or [])
        if not names:
            raise ValueError("choose the corrected Labels layer(s) to learn from")
        tr, va = [], []
        rng = np.random.default_rng(0)
        for name in names:
            layer = self.viewer.layers[name]
            pid = _info(layer).get("patient_id")
            _, image = gather_input(self.viewer, ("patient", pid))
            mask = (np.asarray(layer.data) > 0).astype(np.uint8)
            if mask.shape != image.shape[:3]:
                raise ValueError(f"layer '{name}' is {mask.shape}, its patient's images are {image.shape[:3]}")
            slices = self.selected_slices(layer)
            if not slices:
                raise ValueError(f"layer '{name}': no {self.slice_mode.value} to learn from "
                                 "(paint corrections first, or choose all / listed slices)")
            held: list[int] = []
            if self.validation.value != "none":
                if len(slices) < 2:
                    raise ValueError(f"layer '{name}': validation needs at least 2 selected slices")
                k = max(1, len(slices) // 4)
                held = sorted(rng.choice(slices, size=k, replace=False).tolist())
            learn = [z for z in slices if z not in held]
            if self.context.value:  # every slice but the held-out ones, as the layer shows them
                learn = [z for z in range(mask.shape[0]) if z not in held]
            tr.append((pid, image, mask, learn))
            if held:
                va.append((pid, image, mask, held))
        return tr, va

    @staticmethod
    def build_samples(specs, preprocessing) -> list[data.Sample]:
        """Volume statistics take ~0.1 s per patient: done in the worker, not on napari's main thread."""
        return [data.Sample.from_arrays(pid, image, mask, preprocessing, sl) for pid, image, mask, sl in specs]

    def check_save_path(self, base: checkpoint.Checkpoint) -> Path:
        path = Path(self.save_path.value)
        if not str(self.save_path.value) or path.is_dir():
            raise ValueError("choose where to save the fine-tuned model (a .pt file)")
        if path.resolve() == checkpoint.BUILTIN_FILE.resolve():
            raise ValueError(f"{path}: is the built-in model; save the fine-tuned model to a new file")
        if base.source and base.source != "built-in" and Path(base.source).resolve() == path.resolve():
            raise ValueError(f"{path}: is the starting model; save the fine-tuned model to a new file")
        if path.exists():
            raise FileExistsError(f"{path}: exists; choose a new file name")
        return path

    # -------------------------------------------------------------------------------------------------- work

    def make_job(self):
        """Collect everything on the main thread; return the generator of :func:`train.iter_finetune`."""
        base = self.starting_model()
        self._save_to = self.check_save_path(base)
        tr, va = self.make_samples(base)
        self._patients_trained = [spec[0] for spec in tr]
        self._cancel = threading.Event()
        self.losses, self.val_dice = [], []
        kwargs = dict(steps=self.steps.value, lr=self.lr.value, batch_size=self.batch_size.value,
                      augment=self.augment.value, train_layers=self.train_layers.value, device=self.device.value,
                      cancel=self._cancel)

        def job():
            samples = self.build_samples(tr, base.preprocessing), self.build_samples(va, base.preprocessing)
            return (yield from train.iter_finetune(base, *samples, **kwargs))

        return job()

    def on_event(self, ev) -> None:
        if isinstance(ev, train.StepProgress):
            total = ev.epochs * ev.steps
            done = (ev.epoch - 1) * ev.steps + ev.step
            self.progress.max = total
            self.progress.value = done
            self.losses.append((ev.epoch - 1 + ev.step / ev.steps, ev.loss))
            self.status.value = f"step {done}/{total}  loss {ev.loss:.4f}  ETA {ev.eta_s:.0f}s"
            if done % 10 == 0:  # drawing costs ~50 ms on the main thread; the round's end redraws too
                self._redraw()
        elif isinstance(ev, train.EpochReport):
            if ev.val:
                self.val_dice.append((ev.epoch, ev.val["dsc_mean"]))
            self._redraw()

    def finish(self, result: train.TrainResult) -> checkpoint.Checkpoint:
        """Save the new model where the user chose and make it the Segment widget's model (main thread)."""
        self.result = result
        ckpt = result.checkpoint
        checkpoint.save(ckpt, self._save_to, overwrite=False)
        ckpt.source = str(self._save_to)
        seg = self.segment_widget(create=True)
        seg.set_checkpoint(ckpt)
        self.again_button.enabled = True
        last = result.history[-1] if result.history else {}
        msg = f"saved {self._save_to.name}; the Segment widget now uses it"
        if "val_dsc_mean" in last:
            first = result.history[0]["val_dsc_mean"]
            msg += f"\nval Dice on held-out slices: {first:.3f} (round 1) -> {last['val_dsc_mean']:.3f}"
        self.status.value = msg
        return ckpt

    def start(self, _=None):
        if self.worker is not None:
            return self.worker
        try:
            job = self.make_job()
        except Exception as exc:
            self.status.value = f"cannot fine-tune: {exc}"
            show_error(f"Fine-tune: {exc}")
            return None

        def on_return(result):
            if result is None:
                self.status.value = "cancelled: no model saved; the Segment widget keeps its model"
                show_info("Fine-tuning cancelled")
            else:
                try:
                    self.finish(result)
                except Exception as exc:
                    self.status.value = f"could not save: {exc}"
                    show_error(f"Fine-tune: {exc}")

        def on_error(exc):
            self.status.value = f"failed: {exc}"
            show_error(f"Fine-tune: {exc}")

        self.again_button.enabled = False
        return start_job(self, job, self.train_button, self.cancel_button, on_yield=self.on_event,
                         on_return=on_return, on_error=on_error)

    def cancel(self, _=None) -> None:
        self._cancel.set()

    def segment_again(self, _=None):
        """Run the Segment widget on the (first) patient trained on; edited slices stay the user's."""
        seg = self.segment_widget(create=True)
        if self._patients_trained:
            seg.input.reset_choices()
            seg.input.value = ("patient", self._patients_trained[0])
        return seg.start()
