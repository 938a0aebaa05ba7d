"""Make docs/screenshot.png: napari with the bundled sample patient, its dataset mask and a U-Net prediction.

    xvfb-run -a python docs/make_screenshot.py

The prediction is the built-in model's (the Segment widget's default); the sample patient is in `val`, unseen
in training.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_lgg_seg import _sample_data, inference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 850)
    _, widget = viewer.window.add_plugin_dock_widget("napari-lgg-seg", "Segment tumor (U-Net)")
    viewer.open(str(_sample_data.sample_path()), plugin="napari-lgg-seg")
    assert widget.model_source.value == "built-in"
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
