"""Make docs/screenshot.png: napari with the bundled sample patient, its dataset mask and a U-Net prediction.

    xvfb-run -a python docs/make_screenshot.py

No built-in model ships yet, so the prediction comes from a small U-Net fitted here for a few hundred steps on
six `train` patients (the test suite's fitting helper, longer); the sample patient is in `val`, unseen.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import KAGGLE, LGG, fit_small  # noqa: E402

from napari_lgg_seg import _sample_data, checkpoint, inference, io  # noqa: E402


def main() -> None:
    split = json.loads((LGG / "split.json").read_text())
    train = [io.read_patient(KAGGLE / pid) for pid in split["train"][:6]]
    ckpt = fit_small(train, steps=300)
    path = checkpoint.save(ckpt, Path(tempfile.mkdtemp()) / "screenshot_model.pt")

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 850)
    _, widget = viewer.window.add_plugin_dock_widget("napari-lgg-seg", "Segment tumor (U-Net)")
    viewer.open(str(_sample_data.sample_path()), plugin="napari-lgg-seg")
    widget.model_path.value = path
    pid, job = widget.make_job()
    layer = widget.apply_result(pid, inference.run(job))
    layer.contour = 2
    truth = widget.viewer.layers[f"{pid} mask"]
    truth.opacity = 0.35
    z = int(np.argmax(np.asarray(truth.data).sum(axis=(1, 2))))
    viewer.dims.set_point(0, z)
    app = QApplication.instance()
    for _ in range(30):
        app.processEvents()
    out = ROOT / "docs" / "screenshot.png"
    viewer.screenshot(str(out), canvas_only=False)
    print(f"{out}: slice {z + 1}; {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
