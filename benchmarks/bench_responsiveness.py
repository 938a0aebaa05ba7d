"""Is napari responsive while the Segment widget runs? Measures main-thread event-loop stalls.

A QTimer asks to fire every 10 ms on the main thread; each gap longer than that is time the event loop could not
serve the user. Run under a display (Xvfb here):

    xvfb-run -a python benchmarks/bench_responsiveness.py > benchmarks/bench_responsiveness.txt

The model is the 'fast' preset at native 256x256 (random weights; speed does not depend on them), so the run is
long enough to see stalls; the patient is the bundled sample repeated to 88 slices (a long LGG volume).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
import torch
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_lgg_seg import _sample_data, checkpoint, model
from napari_lgg_seg.widgets.finetune import FinetuneWidget
from napari_lgg_seg.widgets.segment import SegmentWidget


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=88)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    ckpt_path = checkpoint.save(checkpoint.Checkpoint.from_model(model.build("fast"), preset="fast"), tmp / "fast.pt")

    viewer = napari.Viewer(show=True)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment tumor (U-Net)")
    layers = _sample_data.sample_patient()
    reps = -(-args.slices // layers[0][0].shape[0])
    for data, kwargs, kind in layers:
        data = np.concatenate([data] * reps)[: args.slices]
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget.model_path.value = ckpt_path
    widget.precision.value = args.precision
    widget.batch_size.value = args.batch_size
    widget.show_probability.value = True
    app = QApplication.instance()
    for _ in range(50):
        app.processEvents()
        time.sleep(0.01)

    def measure(widget=widget) -> dict:
        """One run of a widget (Segment or Fine-tune) from the button press until 1 s after the result is shown."""
        gaps: list[float] = []
        stamps: list[float] = []
        t0 = time.perf_counter()
        last = [t0]

        def tick():
            now = time.perf_counter()
            gaps.append((now - last[0]) * 1000)
            stamps.append(now - t0)
            last[0] = now

        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(tick)
        timer.start()
        finished: list[float] = []
        worker = widget.start()
        started = time.perf_counter() - t0
        worker.finished.connect(lambda: finished.append(time.perf_counter() - t0))
        while not finished or widget.worker is not None:
            app.processEvents()
            time.sleep(0.001)
        end = time.perf_counter() + 1.0  # keep measuring while napari shows the new data
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)
        timer.stop()
        during = [g for g, t in zip(gaps, stamps) if started < t - g / 1000 and t <= finished[0]]
        after = [g for g, t in zip(gaps, stamps) if t > finished[0]]
        return {"wall": time.perf_counter() - t0, "ticks": len(gaps), "median": statistics.median(gaps),
                "max": max(gaps), "during": during, "after": after, "status": widget.status.value.splitlines()[0],
                "slow": [(t, g) for g, t in zip(gaps, stamps) if g > 50], "segment_s": finished[0] - started}

    runs = [("Segment, first run (napari inserts the prediction and probability layers)", measure()),
            ("Segment, second run (layers updated in place)", measure())]
    # Fine-tune on corrections: 5 edited slices of the prediction, 30 steps, held-out validation
    tune = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(tune, name="Fine-tune on corrections")
    pred = viewer.layers[f"{_sample_data.SAMPLE_PATIENT} prediction"]
    for z in range(8, 13):  # a brush stroke that changes the slice, whatever the prediction was there
        pred.paint((z, 128, 128), 1 - int(np.asarray(pred.data)[z, 128, 128]))
    tune.layers.value = [pred.name]
    tune.steps.value = 30
    tune.save_path.value = tmp / "tuned.pt"
    runs.append(("Fine-tune, 30 steps on 5 edited slices (held-out validation)", measure(tune)))

    print("# Event-loop responsiveness while the Segment and Fine-tune widgets run")
    print()
    print("Command: `xvfb-run -a python benchmarks/bench_responsiveness.py"
          f" --slices {args.slices} --precision {args.precision} --batch-size {args.batch_size}`")
    print()
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"napari {napari.__version__}, Xvfb + Mesa (software OpenGL)")
    print(f"- volume: {args.slices} slices 256x256x3; model: fast preset, {args.precision}, batch {args.batch_size}; "
          "probability map shown too; a QTimer asks to tick every 10 ms on the main thread")
    print()
    print("| run | working | max gap while working | showing the result: max gap | gaps > 100 ms (all) | median gap |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs:
        print(f"| {name} | {r['segment_s']:.1f} s | {max(r['during']):.0f} ms | {max(r['after']):.0f} ms "
              f"| {sum(g > 100 for g in r['during'] + r['after'])} | {r['median']:.1f} ms |")
    print()
    for name, r in runs:
        print(f"- {name}: {r['status']}; gaps over 50 ms (s after the click: ms): "
              + (", ".join(f"{t:.2f}: {g:.0f}" for t, g in r["slow"]) or "none"))
    viewer.close()


if __name__ == "__main__":
    main()
