"""The "Fine-tune on corrections" widget end to end in a headless viewer: edits tracked from paint events,
training without threads and in a worker, progress and plot, cancel, save, hand-over to Segment, segment again."""

import numpy as np
import pytest

from napari_lgg_seg import checkpoint, inference
from napari_lgg_seg.widgets.finetune import FinetuneWidget, edited_slices
from napari_lgg_seg.widgets.segment import SegmentWidget

PLUGIN = "napari-lgg-seg"


@pytest.fixture
def corrected(make_napari_viewer, sample_dir, small_ckpt_file, sample_patient):
    """A viewer with the sample patient, a prediction, and corrections painted on slices 10-12 (1-based)."""
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment tumor (U-Net)")
    _, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune on corrections")
    viewer.open(str(sample_dir), plugin=PLUGIN)
    seg.model_path.value = small_ckpt_file
    pid, job = seg.make_job()
    layer = seg.apply_result(pid, inference.run(job))
    layer.brush_size = 5
    for z in (9, 10, 11):  # the user paints lesion the model missed, or erases what it got wrong
        pred, truth = np.asarray(layer.data[z]), sample_patient.mask[z]
        missed, wrong = np.argwhere((truth == 1) & (pred == 0)), np.argwhere((truth == 0) & (pred == 1))
        (y, x), value = (missed[len(missed) // 2], 1) if len(missed) else (wrong[len(wrong) // 2], 0)
        layer.paint((z, int(y), int(x)), value)
    return viewer, seg, tune, layer


def test_edits_are_tracked_from_paint_events(corrected):
    viewer, seg, tune, layer = corrected
    assert edited_slices(layer) == [9, 10, 11]
    assert layer.name in [v for v in tune.layers.choices]


def test_finetune_without_threads_hands_the_model_to_segment(corrected, tmp_path):
    viewer, seg, tune, layer = corrected
    before = {name: np.asarray(viewer.layers[name].data).copy() for name in [l.name for l in viewer.layers]}
    old_model = seg.checkpoint
    tune.layers.value = [layer.name]
    tune.steps.value = 10
    tune.validation.value = "hold out 25% of the selected slices"
    tune.save_path.value = tmp_path / "tuned.pt"
    job = tune.make_job()
    result = inference.run(job, tune.on_event)
    ckpt = tune.finish(result)
    assert (tmp_path / "tuned.pt").is_file()
    saved = checkpoint.load(tmp_path / "tuned.pt")
    assert saved.parent == old_model.source
    assert seg.checkpoint is ckpt and seg.checkpoint is not old_model
    assert tune.progress.value == tune.progress.max == 10
    assert len(tune.losses) == 10 and len(tune.val_dice) >= 1
    assert "the Segment widget now uses it" in tune.status.value
    for name, data in before.items():  # training never changes the user's layers
        np.testing.assert_array_equal(np.asarray(viewer.layers[name].data), data)


def test_refuses_to_save_over_the_starting_model(corrected):
    viewer, seg, tune, layer = corrected
    tune.layers.value = [layer.name]
    tune.save_path.value = seg.model_path.value
    assert tune.start() is None and "is the starting model" in tune.status.value


def test_finetune_in_a_worker_then_segment_again(corrected, tmp_path, qtbot):
    viewer, seg, tune, layer = corrected
    tune.layers.value = [layer.name]
    tune.steps.value = 6
    tune.validation.value = "none"
    tune.save_path.value = tmp_path / "tuned.pt"
    edited_before = np.asarray(layer.data)[[9, 10, 11]].copy()
    worker = tune.start()
    assert not tune.train_button.enabled and tune.cancel_button.enabled
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: tune.worker is None and tune.again_button.enabled, timeout=10_000)
    assert (tmp_path / "tuned.pt").is_file() and seg.checkpoint.source == str(tmp_path / "tuned.pt")
    seg_worker = tune.segment_again()
    with qtbot.waitSignal(seg_worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: seg.worker is None, timeout=10_000)
    np.testing.assert_array_equal(np.asarray(layer.data)[[9, 10, 11]], edited_before)  # corrections kept
    assert seg.checkpoint.source == str(tmp_path / "tuned.pt")  # segmented with the fine-tuned model
    assert seg.model_path.value == tmp_path / "tuned.pt"
    assert "kept your edits on slices 10, 11, 12" in seg.status.value


def test_cancel_saves_nothing_and_keeps_the_segment_model(corrected, tmp_path, qtbot):
    viewer, seg, tune, layer = corrected
    old_model = seg.load_model()
    tune.layers.value = [layer.name]
    tune.steps.value = 500
    tune.save_path.value = tmp_path / "tuned.pt"
    worker = tune.start()
    qtbot.waitUntil(lambda: tune.progress.value >= 1, timeout=60_000)
    tune.cancel()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: tune.worker is None, timeout=10_000)
    assert "cancelled" in tune.status.value
    assert not (tmp_path / "tuned.pt").exists()
    assert seg.checkpoint is old_model


def test_listed_and_all_slices(corrected):
    viewer, seg, tune, layer = corrected
    tune.slice_mode.value = "listed slices"
    tune.slice_list.value = "2-4,20"
    assert tune.selected_slices(layer) == [1, 2, 3, 19]
    tune.slice_mode.value = "all slices"
    assert tune.selected_slices(layer) == list(range(20))
    assert SegmentWidget.for_viewer(viewer) is seg
