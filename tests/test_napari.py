"""The napari side: manifest, reader, writer and sample through npe2, and the Segment widget in a real viewer."""

import shutil

import numpy as np
import npe2
import pytest
import tifffile

from napari_lgg_seg import _reader, _sample_data, checkpoint, inference, io, metrics
from napari_lgg_seg.widgets.segment import RECORD_KEY, SegmentWidget

PLUGIN = "napari-lgg-seg"


def test_manifest_is_valid_and_discovered():
    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest(PLUGIN)
    assert manifest.display_name == "LGG Segmentation"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment tumor (U-Net)", "Fine-tune on corrections"]
    assert npe2.PluginManifest.from_distribution(PLUGIN).name == PLUGIN  # what `npe2 validate` checks


def test_widget_is_in_the_plugins_menu(make_napari_viewer):
    viewer = make_napari_viewer()

    def texts(menu):
        for action in menu.actions():
            yield action.text()
            if action.menu() is not None:
                yield from texts(action.menu())

    plugins = next(a.menu() for a in viewer.window._qt_window.menuBar().actions() if "Plugins" in a.text())
    entries = list(texts(plugins))  # napari groups a plugin's widgets in a submenu named after the plugin
    assert "LGG Segmentation" in entries
    assert "Segment tumor (U-Net)" in entries and "Fine-tune on corrections" in entries


def test_reader_through_npe2(sample_dir, sample_patient):
    layers = npe2.read([str(sample_dir)], plugin_name=PLUGIN, stack=False)
    names = [kw["name"] for _, kw, _ in layers]
    pid = sample_patient.patient_id
    assert names == [f"{pid} pre-contrast", f"{pid} FLAIR", f"{pid} post-contrast", f"{pid} mask"]
    assert [kw["visible"] for _, kw, t in layers if t == "image"] == [False, True, False]
    for c, (data, kw, kind) in enumerate(layers[:3]):
        assert kind == "image" and data.shape == (20, 256, 256)
        np.testing.assert_array_equal(data, sample_patient.image[..., c])
        assert kw["metadata"]["lgg"]["patient_id"] == pid
        assert kw["metadata"]["lgg"]["paths"][0].endswith(f"{pid}_1.tif")
    data, kw, kind = layers[3]
    assert kind == "labels" and kw["metadata"]["lgg"]["role"] == "truth"
    np.testing.assert_array_equal(data, sample_patient.mask)


def test_reader_declines_non_lgg_folders_and_reads_files(tmp_path, kaggle, sample_dir):
    (tmp_path / "notes.txt").write_text("x")
    assert _reader.get_reader(str(tmp_path)) is None
    assert _reader.get_reader(str(kaggle)) is None  # a dataset root is not one patient
    assert _reader.get_reader(str(tmp_path / "notes.txt")) is None
    layers = npe2.read([str(sample_dir / f"{sample_dir.name}_3_mask.tif")], plugin_name=PLUGIN, stack=False)
    assert layers[0][2] == "labels" and layers[0][0].shape == (1, 256, 256)


def test_writer_through_npe2_and_refusal(tmp_path, sample_patient):
    meta = {"name": "pred", "metadata": {"lgg": {"patient_id": sample_patient.patient_id}}}
    out = tmp_path / "masks"
    # the folder writer is what napari's save dialog calls for "LGG mask slices in a folder"; by command name here
    folder_writer = f"{PLUGIN}.write_mask_folder"
    written = npe2.write(str(out), [(sample_patient.mask, meta, "labels")], plugin_name=folder_writer)
    assert len(written) == 20 and written[0].endswith(f"{sample_patient.patient_id}_1_mask.tif")
    np.testing.assert_array_equal(io.read_stack(written[4])[0] // 255, sample_patient.mask[4])
    with pytest.raises(FileExistsError, match="_1_mask.tif: exists"):
        npe2.write(str(out), [(np.zeros_like(sample_patient.mask), meta, "labels")], plugin_name=folder_writer)
    stack = npe2.write(str(tmp_path / "all.tif"), [(sample_patient.mask, meta, "labels")], plugin_name=PLUGIN)
    assert tifffile.imread(stack[0]).shape == (20, 256, 256)
    with pytest.raises(FileExistsError, match="all.tif: exists"):
        npe2.write(str(tmp_path / "all.tif"), [(sample_patient.mask, meta, "labels")], plugin_name=PLUGIN)


def test_sample_data_is_the_real_patient(sample_patient):
    layers = _sample_data.sample_patient()
    assert len(layers) == 4
    np.testing.assert_array_equal(layers[1][0], sample_patient.image[..., 1])
    np.testing.assert_array_equal(layers[3][0], sample_patient.mask)


# ------------------------------------------------------------------------------------------------ the widget


@pytest.fixture
def viewer_with_patient(make_napari_viewer, sample_dir):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment tumor (U-Net)")
    viewer.open(str(sample_dir), plugin=PLUGIN)
    return viewer, widget


def test_segment_widget_end_to_end_without_threads(viewer_with_patient, small_ckpt_file, sample_patient):
    viewer, widget = viewer_with_patient
    assert isinstance(widget, SegmentWidget)
    pid = sample_patient.patient_id
    assert widget.input.value == ("patient", pid)  # the patient just opened is the default input
    widget.model_path.value = small_ckpt_file
    pid_out, job = widget.make_job()
    result = inference.run(job)
    layer = widget.apply_result(pid_out, result)
    assert layer.name == f"{pid} prediction" and layer.data.shape == (20, 256, 256)
    expected = metrics.dice(result.labels, sample_patient.mask)
    assert widget.last_dice == pytest.approx(expected)
    assert f"Dice vs '{pid} mask': {expected:.3f}" in widget.status.value
    truth = viewer.layers[f"{pid} mask"]
    np.testing.assert_array_equal(truth.data, sample_patient.mask)  # ground truth untouched


def test_rerun_keeps_the_users_edits(viewer_with_patient, small_ckpt_file):
    viewer, widget = viewer_with_patient
    widget.model_path.value = small_ckpt_file
    pid, job = widget.make_job()
    layer = widget.apply_result(pid, inference.run(job))
    # the user paints slice 12 with napari's brush and erases slice 5
    layer.paint((11, 100, 100), 1, refresh=True)
    layer.brush_size = 30
    layer.paint((11, 60, 60), 1)
    layer.data[4] = 0
    edited_12, edited_5 = layer.data[11].copy(), layer.data[4].copy()
    widget.threshold.value = 0.3  # a different run, so unedited slices change
    pid, job = widget.make_job()
    result = inference.run(job)
    again = widget.apply_result(pid, result)
    assert again.name == layer.name  # updated in place (napari hands plugins proxies, so no `is`)
    assert [l.name for l in viewer.layers].count(f"{pid} prediction") == 1
    np.testing.assert_array_equal(layer.data[11], edited_12)
    np.testing.assert_array_equal(layer.data[4], edited_5)
    others = [z for z in range(20) if z not in (4, 11)]
    np.testing.assert_array_equal(layer.data[others], result.labels[others])
    assert "kept your edits on slices 5, 12" in widget.status.value
    assert layer.metadata[RECORD_KEY].shape == (20, 256, 256)


def test_segment_widget_in_a_worker_thread(viewer_with_patient, small_ckpt_file, qtbot):
    viewer, widget = viewer_with_patient
    widget.model_path.value = small_ckpt_file
    widget.show_probability.value = True
    widget.batch_size.value = 4
    worker = widget.start()
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5_000)
    pid = widget.input.value[1]
    assert f"{pid} prediction" in viewer.layers
    qtbot.waitUntil(lambda: f"{pid} probability" in viewer.layers, timeout=5_000)  # added one event-loop turn later
    assert "Dice vs" in widget.status.value and widget.run_button.enabled


def test_cancel_leaves_layers_unchanged(viewer_with_patient, small_ckpt_file, qtbot):
    viewer, widget = viewer_with_patient
    widget.model_path.value = small_ckpt_file
    widget.batch_size.value = 1
    names = [l.name for l in viewer.layers]
    worker = widget.start()
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5_000)
    assert [l.name for l in viewer.layers] == names
    assert "cancelled" in widget.status.value


def test_rgb_and_flair_only_layers_as_input(make_napari_viewer, sample_patient, small_ckpt_file):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.add_image(sample_patient.image, name="rgb volume", rgb=True)
    viewer.add_image(sample_patient.image[..., 1], name="flair only")
    values = list(widget.input.choices)
    assert ("rgb", "rgb volume") in values and ("flair", "flair only") in values
    widget.model_path.value = small_ckpt_file
    for choice in (("rgb", "rgb volume"), ("flair", "flair only")):
        widget.input.value = choice
        pid, job = widget.make_job()
        layer = widget.apply_result(pid, inference.run(job))
        assert layer.data.shape == (20, 256, 256)


def test_bad_model_file_is_reported(make_napari_viewer, tmp_path, sample_dir):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.open(str(sample_dir), plugin=PLUGIN)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    widget.model_path.value = bad
    assert "model not loaded" in widget.status.value and "bad.pt" in widget.status.value
    assert widget.start() is None and "cannot segment" in widget.status.value
